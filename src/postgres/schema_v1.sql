-- turnstile's shared limits, schema version 1.
--
-- Run by `src/postgres/schema.rs` inside one transaction, with __NS__
-- replaced by the namespace's quoted identifier (validated before: a plain
-- identifier) and __KEY__ by the namespace's lock key (a positive integer
-- computed from its name). Nothing else is ever spliced into SQL: names and
-- numbers are bound parameters.
--
-- One transaction-level advisory lock per namespace, (__KEY__, 0), serializes
-- every function that changes slots or queues: the all-or-nothing check over
-- several limits, the fair grants in ticket order and the reaping of dead
-- clients then need no row-lock ordering, and cannot deadlock. Each client
-- holds the session-level advisory lock (__KEY__, its id) for the life of its
-- session: the server frees it the moment the session ends, which is how a
-- killed process is told from a live one.

CREATE TABLE __NS__.limits (
    name         text PRIMARY KEY,
    -- Which creation of the name: a guard of a deleted limit gives nothing
    -- back to a new limit of the same name.
    incarnation  bigint NOT NULL,
    cap          integer NOT NULL CHECK (cap >= 0),
    active       boolean NOT NULL,
    decay        double precision NOT NULL CHECK (decay >= 0),
    held         bigint NOT NULL DEFAULT 0,
    -- Decaying slots as of decaying_at (server clock); they drain at `decay`
    -- per second.
    decaying     double precision NOT NULL DEFAULT 0,
    decaying_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    denied       bigint NOT NULL DEFAULT 0,
    avg_occupancy double precision NOT NULL DEFAULT 2.0,
    -- Sum of the occupy of the waiters queued on it: slots promised to
    -- them, which newcomers may not take.
    queued       bigint NOT NULL DEFAULT 0
);

CREATE SEQUENCE __NS__.incarnations;
CREATE SEQUENCE __NS__.client_ids MAXVALUE 2147483647;

CREATE TABLE __NS__.clients (
    id            bigint PRIMARY KEY,
    lease         double precision NOT NULL,
    lease_until   timestamptz NOT NULL,
    -- When its current session took its advisory lock: a free lock means a
    -- dead client only if the session began after the server last started.
    session_start timestamptz NOT NULL,
    pid           integer,
    host          text
);

-- No foreign keys here or below: each would cost every acquisition a
-- locking look-up of its parent row. The functions delete what belongs
-- together (see drop_client).
CREATE TABLE __NS__.holds (
    id          bigserial PRIMARY KEY,
    client      bigint NOT NULL,
    occupy      integer NOT NULL,
    granted_at  timestamptz NOT NULL,
    -- The client's number for the request, to find it after a lost reply.
    req         bigint NOT NULL,
    -- The limits taken from, and which creation of each (a guard of a
    -- deleted limit gives nothing back to a new one of the same name).
    names        text[] NOT NULL,
    incarnations bigint[] NOT NULL
);
CREATE INDEX ON __NS__.holds (client, req);

CREATE TABLE __NS__.waiters (
    ticket       bigserial PRIMARY KEY,
    client       bigint NOT NULL,
    occupy       integer NOT NULL,
    rate         boolean NOT NULL,
    is_strict    boolean NOT NULL,
    create_missing boolean NOT NULL,
    names        text NOT NULL,
    max_retries  integer,
    attempts     integer NOT NULL DEFAULT 1,
    -- queued | granted | failed
    status       text NOT NULL DEFAULT 'queued',
    hold         bigint,
    granted_at   timestamptz,
    -- When decay alone will let it in, if that is all it waits for.
    decay_at     timestamptz,
    err          text,
    err_name     text,
    err_a        bigint,
    err_b        bigint,
    req          bigint NOT NULL
);
CREATE INDEX ON __NS__.waiters (client, req);
CREATE INDEX ON __NS__.waiters (hold);

-- A queued waiter as each of its limits sees it.
CREATE TABLE __NS__.waiter_limits (
    name    text NOT NULL,
    ticket  bigint NOT NULL,
    occupy  integer NOT NULL,
    PRIMARY KEY (name, ticket)
);
CREATE INDEX ON __NS__.waiter_limits (ticket);

-- Decaying slots left at `t`.
CREATE FUNCTION __NS__.decaying_now(l __NS__.limits, t timestamptz)
RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN l.decaying <= 0 OR l.decay <= 0 OR t <= l.decaying_at THEN greatest(l.decaying, 0)
        ELSE greatest(l.decaying - l.decay * extract(epoch FROM t - l.decaying_at)::float8, 0)
    END
$$;

-- When `occupy` more slots fit behind `reserved`: `t` if now, NULL if decay
-- alone cannot make room.
CREATE FUNCTION __NS__.fits_at(l __NS__.limits, reserved bigint, occupy integer, t timestamptz)
RETURNS timestamptz LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    room double precision := l.cap - l.held - reserved - occupy;
    excess double precision;
BEGIN
    IF room < 0 THEN
        RETURN NULL;
    END IF;
    excess := __NS__.decaying_now(l, t) - room;
    IF excess <= 1e-9 THEN
        RETURN t;
    END IF;
    IF l.decay <= 0 THEN
        RETURN NULL;
    END IF;
    RETURN greatest(t, l.decaying_at) + make_interval(secs => excess / l.decay + 1e-6);
END
$$;

CREATE FUNCTION __NS__.info(p_name text, t timestamptz,
    OUT name text, OUT cap integer, OUT active boolean, OUT decay double precision,
    OUT active_slots bigint, OUT held bigint, OUT denied bigint, OUT waiters bigint,
    OUT avg_occupancy double precision)
LANGUAGE sql STABLE AS $$
    SELECT l.name, l.cap, l.active, l.decay,
           l.held + ceil(greatest(__NS__.decaying_now(l, t) - 1e-9, 0))::bigint,
           l.held, l.denied,
           (SELECT count(*) FROM __NS__.waiter_limits w WHERE w.name = l.name),
           l.avg_occupancy
    FROM __NS__.limits l WHERE l.name = p_name
$$;

CREATE FUNCTION __NS__.notify(p_client bigint, p_ticket bigint, p_what text)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('turnstile___KEY__', p_client || ' ' || p_ticket || ' ' || p_what)
$$;

-- Takes a queued waiter out of every queue (its entries go with it).
CREATE FUNCTION __NS__.unqueue(p_ticket bigint)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    names text[];
BEGIN
    WITH gone AS (
        DELETE FROM __NS__.waiter_limits WHERE ticket = p_ticket RETURNING name, occupy
    ), upd AS (
        UPDATE __NS__.limits l SET queued = l.queued - g.occupy
        FROM gone g WHERE l.name = g.name RETURNING l.name
    )
    SELECT coalesce(array_agg(name), '{}') INTO names FROM upd;
    RETURN names;
END
$$;

-- Fails a queued waiter and lets those behind it move up; returns the
-- limits whose queues it left.
CREATE FUNCTION __NS__.fail(p_ticket bigint, p_err text, p_name text, p_a bigint, p_b bigint,
    p_pump boolean DEFAULT true)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    names text[];
    w __NS__.waiters;
BEGIN
    -- Only a queued waiter can fail (one granted meanwhile keeps its grant).
    SELECT * INTO w FROM __NS__.waiters WHERE ticket = p_ticket AND status = 'queued';
    IF NOT FOUND THEN
        RETURN '{}';
    END IF;
    -- Its client acts on the failure: it must survive a crash.
    PERFORM set_config('synchronous_commit', 'on', true);
    names := __NS__.unqueue(p_ticket);
    UPDATE __NS__.waiters SET status = 'failed', err = p_err, err_name = p_name,
        err_a = p_a, err_b = p_b
    WHERE ticket = p_ticket;
    PERFORM __NS__.notify(w.client, w.ticket, 'done');
    -- Its reservations are gone: those behind it may fit now (unless the
    -- caller pumps once it has failed all it fails).
    IF p_pump THEN
        PERFORM __NS__.pump(names, false, clock_timestamp());
    END IF;
    RETURN names;
END
$$;

-- Lets the current transaction commit without waiting for its WAL flush:
-- for changes whose loss in a server crash is harmless (a waiter's row
-- forgotten after its client saw it, a denial counted, a waiter queued:
-- its client finds it gone and queues again). Any grant in the same
-- transaction turns durability back on.
CREATE FUNCTION __NS__.relaxed()
RETURNS void LANGUAGE sql AS $$
    SELECT set_config('synchronous_commit', 'off', true)
$$;

-- Takes `occupy` held slots of each of `lims` for a client; the new hold.
CREATE FUNCTION __NS__.hold(p_client bigint, p_req bigint, lims text[], p_occupy integer,
    t timestamptz)
RETURNS bigint LANGUAGE sql AS $$
    WITH took AS (
        UPDATE __NS__.limits SET held = held + p_occupy WHERE name = ANY (lims)
        RETURNING name, incarnation
    )
    INSERT INTO __NS__.holds (client, occupy, granted_at, req, names, incarnations)
    SELECT p_client, p_occupy, t, p_req, array_agg(name ORDER BY name),
           array_agg(incarnation ORDER BY name)
      FROM took
    RETURNING id
$$;

-- Takes a waiter's slots on all its limits at once and tells its client.
-- Decaying slots are charged from `since` (at most `t`).
CREATE FUNCTION __NS__.grant(w __NS__.waiters, since timestamptz, t timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    lims text[];
    hold_id bigint;
BEGIN
    SELECT coalesce(array_agg(name ORDER BY name), '{}') INTO lims
      FROM __NS__.waiter_limits WHERE ticket = w.ticket;
    -- A grant must survive a crash of the server: its client will act on
    -- it. (Transactions that grant nothing may commit without waiting for
    -- the disk: see `relaxed`.)
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM __NS__.unqueue(w.ticket);
    IF w.rate THEN
        UPDATE __NS__.limits l
           SET decaying = __NS__.decaying_now(l, greatest(since, l.decaying_at)) + w.occupy,
               decaying_at = greatest(since, l.decaying_at)
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
    -- A rate grant makes its followers wait on decay rather than on its
    -- reservation: a pump looks at them after it in ticket order (never
    -- from here, which would recurse once per waiter).
END
$$;

-- Looks at one queued waiter: grants it if it fits all its limits behind
-- the waiters queued before it; else, if `p_counts`, counts an attempt
-- (failing it when out of retries) and keeps its decay instant fresh.
-- `p_own`: the waiter's own retry (its client's timer), which may backdate
-- a rate-limit grant to its decay instant.
CREATE FUNCTION __NS__.consider(p_ticket bigint, p_counts boolean, p_own boolean, t timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    w __NS__.waiters;
    r record;
    fit boolean := true;
    at timestamptz := t;
BEGIN
    SELECT * INTO w FROM __NS__.waiters WHERE ticket = p_ticket;
    IF NOT FOUND OR w.status <> 'queued' THEN
        RETURN;
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
            IF f IS NULL OR f > t THEN
                fit := false;
            END IF;
            at := CASE WHEN at IS NULL OR f IS NULL THEN NULL ELSE greatest(at, f) END;
        END;
    END LOOP;
    IF fit THEN
        PERFORM __NS__.grant(w, CASE WHEN p_own AND w.decay_at IS NOT NULL
                                          AND w.decay_at <= t THEN w.decay_at ELSE t END, t);
        RETURN;
    END IF;
    IF p_counts AND w.max_retries IS NOT NULL THEN
        UPDATE __NS__.waiters SET attempts = attempts + 1 WHERE ticket = p_ticket
        RETURNING attempts INTO w.attempts;
        IF w.attempts > w.max_retries THEN
            PERFORM __NS__.fail(p_ticket, 'retries', w.names, w.occupy, w.attempts);
            RETURN;
        END IF;
    END IF;
    IF at IS DISTINCT FROM w.decay_at THEN
        UPDATE __NS__.waiters SET decay_at = at WHERE ticket = p_ticket;
        IF at IS NOT NULL AND (w.decay_at IS NULL OR at < w.decay_at) THEN
            PERFORM __NS__.notify(w.client, w.ticket, 'timer');
        END IF;
    END IF;
END
$$;

-- Looks at every waiter queued on `p_names`, in ticket order.
CREATE FUNCTION __NS__.pump(p_names text[], p_counts boolean, t timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tk bigint;
BEGIN
    FOR tk IN
        SELECT DISTINCT ticket FROM __NS__.waiter_limits WHERE name = ANY (p_names) ORDER BY ticket
    LOOP
        PERFORM __NS__.consider(tk, p_counts, false, t);
    END LOOP;
END
$$;

-- The outcome of an acquisition's first attempt, a look, a withdrawal or a
-- release: what the client needs, in one row.
CREATE TYPE __NS__.outcome AS (
    outcome   text,          -- taken | refused | queued | error | lost | gone
    id        bigint,        -- hold (taken; 0: nothing held) or ticket (queued)
    err       text,          -- not_found | occupy | no_decay | retries | invalid
    err_name  text,
    err_a     bigint,
    err_b     bigint,
    wait_secs double precision, -- queued: seconds until decay lets it in (NULL: not by decay)
    secs      double precision  -- taken: seconds since the grant; released: seconds held
);

-- The first attempt of an acquisition: creates missing limits if asked,
-- takes the slots if they fit now (behind every queued waiter), else queues
-- it if `p_queue`. One round trip, one transaction.
CREATE FUNCTION __NS__.acquire(p_client bigint, p_req bigint, p_names text[], p_occupy integer,
    p_rate boolean, p_strict boolean, p_create boolean, p_max_retries integer, p_queue boolean)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    n text;
    lim __NS__.limits;
    fits boolean := true;
    lims text[] := '{}';
    hold_id bigint := 0;
    tk bigint;
    w __NS__.waiters;
    joined text := array_to_string(p_names, ', ');
    found integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    IF NOT EXISTS (SELECT 1 FROM __NS__.clients WHERE id = p_client) THEN
        RETURN ROW('lost', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
    END IF;
    IF p_strict THEN
        FOREACH n IN ARRAY p_names LOOP
            IF NOT EXISTS (SELECT 1 FROM __NS__.limits WHERE name = n) THEN
                RETURN ROW('error', 0, 'not_found', n, NULL, NULL, NULL, NULL)::__NS__.outcome;
            END IF;
        END LOOP;
    END IF;
    FOR lim IN SELECT * FROM __NS__.limits WHERE name = ANY (p_names) ORDER BY name LOOP
        found := found + 1;
        CONTINUE WHEN NOT lim.active;
        IF lim.cap > 0 AND p_occupy > lim.cap THEN
            RETURN ROW('error', 0, 'occupy', lim.name, p_occupy, lim.cap, NULL, NULL)::__NS__.outcome;
        END IF;
        IF p_rate AND lim.decay <= 0 THEN
            RETURN ROW('error', 0, 'no_decay', lim.name, NULL, NULL, NULL, NULL)::__NS__.outcome;
        END IF;
        lims := lims || lim.name;
        -- Without decaying slots (the usual case) fitting is arithmetic.
        IF lim.decaying <= 0 THEN
            fits := fits AND lim.held + lim.queued + p_occupy <= lim.cap;
        ELSIF __NS__.fits_at(lim, lim.queued, p_occupy, t) IS DISTINCT FROM t THEN
            fits := false;
        END IF;
    END LOOP;
    -- (Duplicate names make this look missing ones up for nothing.)
    IF p_create AND found < cardinality(p_names) THEN
        -- As Prefect's server did: inactive with limit 1 (after the checks:
        -- an acquisition that fails creates nothing).
        INSERT INTO __NS__.limits (name, incarnation, cap, active, decay)
        SELECT missing, nextval('__NS__.incarnations'), 1, false, 0
          FROM (SELECT DISTINCT n2 AS missing FROM unnest(p_names) AS n2
                 WHERE NOT EXISTS (SELECT 1 FROM __NS__.limits WHERE name = n2)) m;
    END IF;
    IF fits THEN
        IF p_rate THEN
            UPDATE __NS__.limits l
               SET decaying = __NS__.decaying_now(l, t) + p_occupy, decaying_at = greatest(t, l.decaying_at)
             WHERE l.name = ANY (lims);
        ELSIF cardinality(lims) > 0 THEN
            hold_id := __NS__.hold(p_client, p_req, lims, p_occupy, t);
        END IF;
        RETURN ROW('taken', hold_id, NULL, NULL, NULL, NULL, NULL, 0)::__NS__.outcome;
    END IF;
    PERFORM __NS__.relaxed();
    UPDATE __NS__.limits SET denied = denied + p_occupy WHERE name = ANY (lims);
    IF p_max_retries = 0 THEN
        RETURN ROW('error', 0, 'retries', joined, p_occupy, 1, NULL, NULL)::__NS__.outcome;
    END IF;
    IF NOT p_queue THEN
        RETURN ROW('refused', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
    END IF;
    INSERT INTO __NS__.waiters (client, occupy, rate, is_strict, create_missing, names, max_retries, req)
    VALUES (p_client, p_occupy, p_rate, p_strict, p_create, joined, p_max_retries, p_req)
    RETURNING ticket INTO tk;
    INSERT INTO __NS__.waiter_limits (name, ticket, occupy)
    SELECT unnest(lims), tk, p_occupy;
    UPDATE __NS__.limits SET queued = queued + p_occupy WHERE name = ANY (lims);
    -- Its decay instant (or, if time moved since the check, its grant).
    PERFORM __NS__.consider(tk, false, false, t);
    RETURN __NS__.look_at(p_client, tk, t);
END
$$;

-- What became of a waiter, as its client sees it; a finished one is
-- forgotten once seen.
CREATE FUNCTION __NS__.look_at(p_client bigint, p_ticket bigint, t timestamptz)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    w __NS__.waiters;
BEGIN
    SELECT * INTO w FROM __NS__.waiters WHERE ticket = p_ticket AND client = p_client;
    IF NOT FOUND THEN
        RETURN ROW('gone', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
    END IF;
    IF w.status = 'granted' THEN
        -- Kept, so that a retried look (its answer lost) says the same; it
        -- goes with the hold's release, or after a lease.
        RETURN ROW('taken', coalesce(w.hold, 0), NULL, NULL, NULL, NULL, NULL,
                   greatest(extract(epoch FROM t - w.granted_at)::float8, 0))::__NS__.outcome;
    ELSIF w.status = 'failed' THEN
        DELETE FROM __NS__.waiters WHERE ticket = p_ticket;
        RETURN ROW('error', 0, w.err, w.err_name, w.err_a, w.err_b, NULL, NULL)::__NS__.outcome;
    END IF;
    RETURN ROW('queued', p_ticket, NULL, NULL, NULL, NULL,
               extract(epoch FROM w.decay_at - t)::float8, NULL)::__NS__.outcome;
END
$$;

-- A waiter's client looks at it (woken, or its decay timer fired): runs
-- its own retry when its decay instant has come.
CREATE FUNCTION __NS__.look(p_client bigint, p_ticket bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    w __NS__.waiters;
    lims text[];
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    PERFORM __NS__.relaxed();
    t := clock_timestamp();
    SELECT * INTO w FROM __NS__.waiters WHERE ticket = p_ticket AND client = p_client;
    IF FOUND AND w.status = 'queued' AND w.decay_at IS NOT NULL AND w.decay_at <= t THEN
        lims := ARRAY(SELECT name FROM __NS__.waiter_limits WHERE ticket = p_ticket);
        PERFORM __NS__.consider(p_ticket, true, true, t);
        IF w.rate THEN
            -- Granted or not, its followers' decay instants moved.
            PERFORM __NS__.pump(lims, false, t);
        END IF;
    END IF;
    RETURN __NS__.look_at(p_client, p_ticket, t);
END
$$;

-- A waiter gives up (timed out, cancelled): out of every queue, and those
-- behind it move up. If it was granted meanwhile, the grant is reported
-- (and the client gives it back or keeps it).
CREATE FUNCTION __NS__.withdraw(p_client bigint, p_ticket bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    w __NS__.waiters;
    names text[];
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    SELECT * INTO w FROM __NS__.waiters WHERE ticket = p_ticket AND client = p_client;
    IF FOUND AND w.status = 'queued' THEN
        names := __NS__.unqueue(p_ticket);
        DELETE FROM __NS__.waiters WHERE ticket = p_ticket;
        PERFORM __NS__.pump(names, false, t);
        RETURN ROW('gone', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
    END IF;
    RETURN __NS__.look_at(p_client, p_ticket, t);
END
$$;

-- Gives a hold's slots back (to the incarnations it took them from) and
-- hands them to the waiters that now fit. `lost` if the hold is not the
-- client's any more (its lease expired).
CREATE FUNCTION __NS__.release(p_client bigint, p_hold bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    h __NS__.holds;
    secs double precision;
    names text[];
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    SELECT * INTO h FROM __NS__.holds WHERE id = p_hold AND client = p_client;
    IF NOT FOUND THEN
        RETURN ROW('lost', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
    END IF;
    secs := greatest(extract(epoch FROM t - h.granted_at)::float8, 0);
    WITH gave AS (
        UPDATE __NS__.limits l
           SET held = greatest(l.held - h.occupy, 0),
               avg_occupancy = l.avg_occupancy
                   + (greatest(secs / greatest(h.occupy, 1), 0.1) - l.avg_occupancy)
                     / (2 * greatest(l.cap, 1))
          FROM unnest(h.names, h.incarnations) AS hl(name, incarnation)
         WHERE hl.name = l.name AND hl.incarnation = l.incarnation
        RETURNING l.name
    ) SELECT coalesce(array_agg(name), '{}') INTO names FROM gave;
    DELETE FROM __NS__.holds WHERE id = p_hold;
    DELETE FROM __NS__.waiters WHERE hold = p_hold;
    PERFORM __NS__.pump(names, true, t);
    RETURN ROW('released', 0, NULL, NULL, NULL, NULL, NULL, secs)::__NS__.outcome;
END
$$;

-- Finds what became of a request whose reply was lost (the connection broke
-- during the call): its hold, or its waiter, if the call committed.
CREATE FUNCTION __NS__.find_request(p_client bigint, p_req bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    hold_id bigint;
    tk bigint;
BEGIN
    SELECT id INTO hold_id FROM __NS__.holds WHERE client = p_client AND req = p_req;
    IF FOUND THEN
        RETURN ROW('taken', hold_id, NULL, NULL, NULL, NULL, NULL, 0)::__NS__.outcome;
    END IF;
    SELECT ticket INTO tk FROM __NS__.waiters WHERE client = p_client AND req = p_req;
    IF FOUND THEN
        RETURN __NS__.look(p_client, tk);
    END IF;
    RETURN ROW('gone', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
END
$$;

-- Undoes request `p_req` of a client that gave up on it without knowing
-- whether it happened (its reply was lost): its waiter withdrawn, its hold
-- (granted at once or later) given back.
CREATE FUNCTION __NS__.abandon_request(p_client bigint, p_req bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    tk bigint;
    hold_id bigint;
BEGIN
    FOR tk IN SELECT ticket FROM __NS__.waiters WHERE client = p_client AND req = p_req LOOP
        PERFORM __NS__.withdraw(p_client, tk);
    END LOOP;
    FOR hold_id IN SELECT id FROM __NS__.holds WHERE client = p_client AND req = p_req LOOP
        PERFORM __NS__.release(p_client, hold_id);
    END LOOP;
    RETURN ROW('gone', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
END
$$;

-- Management. Errors are raised with SQLSTATEs of our own: TS404 (no such
-- limit), TS409 (exists), TS422 (invalid value).

CREATE FUNCTION __NS__.create_limit(p_name text, p_cap integer, p_active boolean, p_decay double precision)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    INSERT INTO __NS__.limits (name, incarnation, cap, active, decay)
    VALUES (p_name, nextval('__NS__.incarnations'), p_cap, p_active, p_decay);
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'limit exists' USING ERRCODE = 'TS409';
END
$$;

-- The waiters queued on a limit, in ticket order.
CREATE FUNCTION __NS__.queued_on(p_name text)
RETURNS SETOF __NS__.waiters LANGUAGE sql STABLE AS $$
    SELECT ws.* FROM __NS__.waiters ws JOIN __NS__.waiter_limits wl ON wl.ticket = ws.ticket
     WHERE wl.name = p_name AND ws.status = 'queued' ORDER BY ws.ticket
$$;

-- Takes `p_name` out of the needs of every waiter queued on it (the limit
-- was deactivated or deleted); strict waiters fail when it is deleted.
-- Returns the tickets to look at again.
CREATE FUNCTION __NS__.forget_limit(p_name text, p_deleted boolean)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    w __NS__.waiters;
    tickets bigint[] := '{}';
BEGIN
    FOR w IN
        SELECT * FROM __NS__.queued_on(p_name)
    LOOP
        IF p_deleted AND w.is_strict THEN
            PERFORM __NS__.fail(w.ticket, 'not_found', p_name, NULL, NULL, false);
        ELSE
            DELETE FROM __NS__.waiter_limits WHERE ticket = w.ticket AND name = p_name;
            tickets := tickets || w.ticket;
        END IF;
    END LOOP;
    UPDATE __NS__.limits SET queued = 0 WHERE name = p_name;
    RETURN tickets;
END
$$;

CREATE FUNCTION __NS__.recheck(p_tickets bigint[], t timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tk bigint;
BEGIN
    FOREACH tk IN ARRAY p_tickets LOOP
        PERFORM __NS__.consider(tk, true, false, t);
    END LOOP;
END
$$;

-- Fails the waiters of `p_name` that can never fit its configuration now.
CREATE FUNCTION __NS__.fail_impossible(p_name text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    l __NS__.limits;
    w __NS__.waiters;
BEGIN
    SELECT * INTO l FROM __NS__.limits WHERE name = p_name;
    FOR w IN
        SELECT * FROM __NS__.queued_on(p_name)
    LOOP
        IF l.cap > 0 AND w.occupy > l.cap THEN
            PERFORM __NS__.fail(w.ticket, 'occupy', p_name, w.occupy, l.cap);
        ELSIF w.rate AND l.decay <= 0 THEN
            PERFORM __NS__.fail(w.ticket, 'no_decay', p_name, NULL, NULL);
        END IF;
    END LOOP;
END
$$;

-- Changes a limit; NULL arguments change nothing. A change that changes
-- nothing costs waiters nothing (no attempt counted).
CREATE FUNCTION __NS__.update_limit(p_name text, p_cap integer, p_active boolean, p_decay double precision)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    l __NS__.limits;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    SELECT * INTO l FROM __NS__.limits WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such limit' USING ERRCODE = 'TS404';
    END IF;
    IF coalesce(p_cap, l.cap) = l.cap AND coalesce(p_active, l.active) = l.active
       AND coalesce(p_decay, l.decay) = l.decay THEN
        RETURN;
    END IF;
    IF p_decay IS NOT NULL AND p_decay <> l.decay THEN
        -- What drained before stays drained.
        UPDATE __NS__.limits x SET decaying = __NS__.decaying_now(x, t),
               decaying_at = greatest(t, x.decaying_at), decay = p_decay
         WHERE x.name = p_name;
    END IF;
    UPDATE __NS__.limits SET cap = coalesce(p_cap, cap), active = coalesce(p_active, active)
     WHERE name = p_name;
    IF l.active AND NOT coalesce(p_active, l.active) THEN
        PERFORM __NS__.recheck(__NS__.forget_limit(p_name, false), t);
    ELSIF coalesce(p_active, l.active) THEN
        PERFORM __NS__.fail_impossible(p_name);
        PERFORM __NS__.pump(ARRAY[p_name], true, t);
    END IF;
END
$$;

-- Deletes a limit: its waiters go on as for a missing limit (strict ones
-- fail; the others re-create it, inactive with limit 1, if they would
-- create a missing one, else skip it); guards holding its slots give
-- nothing back, not even to a new limit of the same name.
CREATE FUNCTION __NS__.delete_limit(p_name text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    tickets bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    IF NOT EXISTS (SELECT 1 FROM __NS__.limits WHERE name = p_name) THEN
        RAISE EXCEPTION 'no such limit' USING ERRCODE = 'TS404';
    END IF;
    tickets := __NS__.forget_limit(p_name, true);
    DELETE FROM __NS__.limits WHERE name = p_name;
    IF EXISTS (SELECT 1 FROM __NS__.waiters WHERE ticket = ANY (tickets) AND create_missing) THEN
        INSERT INTO __NS__.limits (name, incarnation, cap, active, decay)
        VALUES (p_name, nextval('__NS__.incarnations'), 1, false, 0);
    END IF;
    PERFORM __NS__.recheck(tickets, t);
    -- The strict waiters failed above left room behind them (as one
    -- pump after all the failures, as in one process).
    PERFORM __NS__.pump(ARRAY(SELECT DISTINCT name FROM __NS__.waiter_limits), false, t);
END
$$;

CREATE FUNCTION __NS__.reset_limit(p_name text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    UPDATE __NS__.limits SET decaying = 0, decaying_at = greatest(t, decaying_at), denied = 0
     WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such limit' USING ERRCODE = 'TS404';
    END IF;
    PERFORM __NS__.pump(ARRAY[p_name], true, t);
END
$$;

-- Clients and their leases.

-- Registers a client whose session holds the advisory lock (__KEY__, p_id).
CREATE FUNCTION __NS__.register(p_id bigint, p_lease double precision, p_pid integer, p_host text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := clock_timestamp();
BEGIN
    INSERT INTO __NS__.clients (id, lease, lease_until, session_start, pid, host)
    VALUES (p_id, p_lease, t + make_interval(secs => p_lease), t, p_pid, p_host);
END
$$;

-- Renews a client's lease, counted from now; false if it is gone (its lease
-- expired, or it was taken for dead). `p_resumed`: its session is new (a
-- reconnection) and holds its advisory lock again.
CREATE FUNCTION __NS__.renew(p_id bigint, p_resumed boolean)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := clock_timestamp();
BEGIN
    UPDATE __NS__.clients
       SET lease_until = greatest(lease_until, t + make_interval(secs => lease)),
           session_start = CASE WHEN p_resumed THEN t ELSE session_start END
     WHERE id = p_id AND lease_until >= t;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Grants of nothing held (rate limits, inactive limits) told by
    -- notification and never looked at.
    DELETE FROM __NS__.waiters
     WHERE client = p_id AND status = 'granted' AND hold IS NULL
       AND granted_at < t - make_interval(secs => (SELECT lease FROM __NS__.clients WHERE id = p_id));
    RETURN true;
END
$$;

-- Gives back everything a client holds and withdraws its waiters.
CREATE FUNCTION __NS__.drop_client(p_id bigint, t timestamptz)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    names text[] := '{}';
    more text[];
    tk bigint;
BEGIN
    WITH gave AS (
        UPDATE __NS__.limits l SET held = greatest(l.held - s.occupy, 0)
          FROM (SELECT hl.name, hl.incarnation, sum(h.occupy) AS occupy
                  FROM __NS__.holds h, unnest(h.names, h.incarnations) AS hl(name, incarnation)
                 WHERE h.client = p_id GROUP BY hl.name, hl.incarnation) s
         WHERE l.name = s.name AND l.incarnation = s.incarnation
        RETURNING l.name
    ) SELECT coalesce(array_agg(name), '{}') INTO names FROM gave;
    FOR tk IN SELECT ticket FROM __NS__.waiters WHERE client = p_id AND status = 'queued' LOOP
        more := __NS__.unqueue(tk);
        names := names || more;
    END LOOP;
    DELETE FROM __NS__.holds WHERE client = p_id;
    DELETE FROM __NS__.waiter_limits
     WHERE ticket IN (SELECT ticket FROM __NS__.waiters WHERE client = p_id);
    DELETE FROM __NS__.waiters WHERE client = p_id;
    DELETE FROM __NS__.clients WHERE id = p_id;
    PERFORM __NS__.notify(p_id, 0, 'lost');
    RETURN names;
END
$$;

-- Frees what dead clients held: those whose lease ran out, and those whose
-- session ended (their advisory lock is free) since the server last
-- started (after a restart every lock is free: the lease decides).
-- Returns how many were dropped.
CREATE FUNCTION __NS__.reap()
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
    c bigint;
    names text[] := '{}';
    n integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    FOR c IN
        SELECT cl.id FROM __NS__.clients cl
         WHERE cl.lease_until < t
            OR (cl.session_start >= pg_postmaster_start_time()
                AND NOT EXISTS (
                    SELECT 1 FROM pg_locks k
                     WHERE k.locktype = 'advisory' AND k.granted
                       AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       AND k.classid = __KEY__::oid AND k.objid = cl.id::oid AND k.objsubid = 2))
    LOOP
        names := names || __NS__.drop_client(c, t);
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        PERFORM __NS__.pump(names, true, t);
    END IF;
    RETURN n;
END
$$;

-- A client leaving: everything back.
CREATE FUNCTION __NS__.unregister(p_id bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    t := clock_timestamp();
    PERFORM __NS__.pump(__NS__.drop_client(p_id, t), true, t);
END
$$;
