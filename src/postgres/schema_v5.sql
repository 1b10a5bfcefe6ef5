-- turnstile's shared limits, schema version 5 (run after version 4, or on a
-- version 4 namespace to migrate it; the same substitutions).
--
-- A rate-limit waiter is let in by its own look at its decay instant. Since
-- version 4 a grant is charged from when it is made, so a look that arrives
-- late (the client's timer, then the trip) slows the pace: 1.26x the rate
-- for a limit of 1 at 500/s across 4 processes (benches/shared.rs case 5).
-- Clients now send the look a little early, and the server waits out the
-- rest here, before the namespace's lock (so nobody else waits for it).

CREATE FUNCTION __NS__.look_soon(p_client bigint, p_ticket bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    early double precision;
BEGIN
    SELECT extract(epoch FROM w.decay_at - clock_timestamp()) INTO early
      FROM __NS__.waiters w
     WHERE w.ticket = p_ticket AND w.client = p_client AND w.status = 'queued';
    -- At most a few milliseconds: a look much earlier is answered at once
    -- (with the time left), as before.
    IF early > 0 AND early <= 0.005 THEN
        PERFORM pg_sleep(early);
    END IF;
    RETURN __NS__.look(p_client, p_ticket);
END
$$;
