-- turnstile's shared limits, schema version 2 (run after version 1, or on a
-- version 1 namespace to migrate it; the same substitutions).
--
-- A pump (after a release, a withdrawal, a reaping, an edit) looked at every
-- waiter queued on the limits concerned, and each look summed the waiters
-- ahead of it: quadratic in the queue, 70-100 ms per release with 1,000
-- waiters on one limit. Now a look says on which limits the waiter has no
-- room at all, and the pump passes over the later waiters on those limits:
-- nothing a pump does makes room for them (a grant moves an earlier
-- waiter's slots from reserved to held, and the waiter without room stays
-- queued ahead of them), so they are looked at only to count an attempt
-- (`max_retries`).

DROP FUNCTION __NS__.pump(text[], boolean, timestamptz);
DROP FUNCTION __NS__.consider(bigint, boolean, boolean, timestamptz);

-- Looks at one queued waiter: grants it if it fits all its limits behind
-- the waiters queued before it; else, if `p_counts`, counts an attempt
-- (failing it when out of retries) and keeps its decay instant fresh.
-- `p_own`: the waiter's own retry (its client's timer), which may backdate
-- a rate-limit grant to its decay instant. Returns the limits on which a
-- waiter that stays queued has no room even once decay has drained (none
-- if granted, failed or gone).
CREATE FUNCTION __NS__.consider(p_ticket bigint, p_counts boolean, p_own boolean, t timestamptz)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    w __NS__.waiters;
    r record;
    fit boolean := true;
    at timestamptz := t;
    full_on text[] := '{}';
BEGIN
    SELECT * INTO w FROM __NS__.waiters WHERE ticket = p_ticket;
    IF NOT FOUND OR w.status <> 'queued' THEN
        RETURN '{}';
    END IF;
    FOR r IN
        SELECT l AS lim,
               (SELECT coalesce(sum(o.occupy), 0) FROM __NS__.waiter_limits o
                 WHERE o.name = wl.name AND o.ticket < wl.ticket) AS reserved
        FROM __NS__.waiter_limits wl JOIN __NS__.limits l ON l.name = wl.name
        WHERE wl.ticket = p_ticket
    LOOP
        DECLARE
            f timestamptz := __NS__.fits_at(r.lim, r.reserved, w.occupy, t);
        BEGIN
            IF f IS NULL THEN
                full_on := full_on || (r.lim).name;
            END IF;
            IF f IS NULL OR f > t THEN
                fit := false;
            END IF;
            at := CASE WHEN at IS NULL OR f IS NULL THEN NULL ELSE greatest(at, f) END;
        END;
    END LOOP;
    IF fit THEN
        PERFORM __NS__.grant(w, CASE WHEN p_own AND w.decay_at IS NOT NULL
                                          AND w.decay_at <= t THEN w.decay_at ELSE t END, t);
        RETURN '{}';
    END IF;
    IF p_counts AND w.max_retries IS NOT NULL THEN
        UPDATE __NS__.waiters SET attempts = attempts + 1 WHERE ticket = p_ticket
        RETURNING attempts INTO w.attempts;
        IF w.attempts > w.max_retries THEN
            -- Its slots are no longer reserved: those behind it may fit.
            PERFORM __NS__.fail(p_ticket, 'retries', w.names, w.occupy, w.attempts);
            RETURN '{}';
        END IF;
    END IF;
    IF at IS DISTINCT FROM w.decay_at THEN
        UPDATE __NS__.waiters SET decay_at = at WHERE ticket = p_ticket;
        IF at IS NOT NULL AND (w.decay_at IS NULL OR at < w.decay_at) THEN
            PERFORM __NS__.notify(w.client, w.ticket, 'timer');
        END IF;
    END IF;
    RETURN full_on;
END
$$;

-- Looks at the waiters queued on `p_names`, in ticket order, passing over
-- those with no room on a limit (see above) unless an attempt is counted,
-- and stopping once none of `p_names` has room for anyone further back
-- (but for the attempts left to count).
CREATE FUNCTION __NS__.pump(p_names text[], p_counts boolean, t timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tk bigint;
    names text[];
    counted boolean;
    full_on text[] := '{}';
BEGIN
    FOR tk IN
        SELECT DISTINCT ticket FROM __NS__.waiter_limits WHERE name = ANY (p_names) ORDER BY ticket
    LOOP
        IF p_names <@ full_on THEN
            EXIT WHEN NOT p_counts;
            FOR tk IN
                SELECT w.ticket FROM __NS__.waiters w
                 WHERE w.max_retries IS NOT NULL AND w.status = 'queued' AND w.ticket >= tk
                   AND EXISTS (SELECT 1 FROM __NS__.waiter_limits wl
                                WHERE wl.ticket = w.ticket AND wl.name = ANY (p_names))
                 ORDER BY w.ticket
            LOOP
                PERFORM __NS__.consider(tk, true, false, t);
            END LOOP;
            EXIT;
        END IF;
        names := ARRAY(SELECT a.name FROM __NS__.waiter_limits a WHERE a.ticket = tk);
        IF names && full_on THEN
            SELECT w.max_retries IS NOT NULL INTO counted FROM __NS__.waiters w WHERE w.ticket = tk;
            CONTINUE WHEN NOT (p_counts AND counted);
        END IF;
        full_on := full_on || __NS__.consider(tk, p_counts, false, t);
    END LOOP;
END
$$;

-- The waiters whose attempts count, for the pumps above.
CREATE INDEX ON __NS__.waiters (ticket) WHERE max_retries IS NOT NULL;
