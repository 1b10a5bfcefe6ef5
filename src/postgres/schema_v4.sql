-- turnstile's shared limits, schema version 4 (run after version 3, or on a
-- version 3 namespace to migrate it; the same substitutions).
--
-- A rate-limit waiter granted by its own look, which came after its decay
-- instant, was charged from that instant. Where the bucket had emptied in
-- between, that credited it with the time the bucket sat empty: grants made
-- together after late looks went over the bucket (5 slots made within
-- 3.4 ms on a limit of 3 at 30/s, tests/shared_clock.rs). Where the bucket
-- had not emptied, charging from the decay instant and from now leave the
-- same state. A grant is now charged from when it is made (the statement's
-- own clock: a pump may reach it a while after the transaction began); the
-- waiter's wait still ends at its decay instant.

CREATE OR REPLACE FUNCTION __NS__.grant(w __NS__.waiters, since timestamptz, t timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    lims text[];
    hold_id bigint;
    made timestamptz;
BEGIN
    SELECT coalesce(array_agg(name ORDER BY name), '{}') INTO lims
      FROM __NS__.waiter_limits WHERE ticket = w.ticket;
    -- A grant must survive a crash of the server: its client will act on
    -- it. (Transactions that grant nothing may commit without waiting for
    -- the disk: see `relaxed`.)
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM __NS__.unqueue(w.ticket);
    IF w.rate THEN
        made := clock_timestamp();
        UPDATE __NS__.limits l
           SET decaying = __NS__.decaying_now(l, greatest(made, l.decaying_at)) + w.occupy,
               decaying_at = greatest(made, l.decaying_at)
         WHERE l.name = ANY (lims);
    ELSIF cardinality(lims) > 0 THEN
        hold_id := __NS__.hold(w.client, w.req, lims, w.occupy, t);
    END IF;
    UPDATE __NS__.waiters SET status = 'granted', hold = hold_id, granted_at = since
     WHERE ticket = w.ticket;
    -- The grant itself travels with the notification (delivered once the
    -- commit is durable), so the waiter need not ask for it; its row goes
    -- with the hold's release (or, holding nothing, with its client's
    -- next renewal after a lease), and answers a `look` until then.
    PERFORM __NS__.notify(w.client, w.ticket, 'granted ' || coalesce(hold_id, 0));
END
$$;
