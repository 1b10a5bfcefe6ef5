-- turnstile's shared limits, schema version 3 (run after version 2, or on a
-- version 2 namespace to migrate it; the same substitutions).
--
-- A request whose reply the client lost (its deadline cut the call off, or
-- the connection broke) may still be on its way to the server, or waiting
-- there for the namespace's lock, when the client asks what became of it
-- (find_request) or gives it up (abandon_request). Both looked without the
-- lock, found nothing, and the request then committed: a hold, or a ticket
-- later granted, that no guard owned, kept until the client ended. Now both
-- take the lock (so they come after a request already waiting for it) and,
-- finding nothing, leave a tombstone: the request, should it come later,
-- fails and takes nothing.

CREATE TABLE __NS__.abandoned (
    client  bigint NOT NULL,
    req     bigint NOT NULL,
    PRIMARY KEY (client, req)
);

CREATE FUNCTION __NS__.refuse_abandoned()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM __NS__.abandoned WHERE client = NEW.client AND req = NEW.req) THEN
        RAISE EXCEPTION 'request % of client % was given up', NEW.req, NEW.client
            USING ERRCODE = 'TS410';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER refuse_abandoned BEFORE INSERT ON __NS__.holds
    FOR EACH ROW EXECUTE FUNCTION __NS__.refuse_abandoned();
CREATE TRIGGER refuse_abandoned BEFORE INSERT ON __NS__.waiters
    FOR EACH ROW EXECUTE FUNCTION __NS__.refuse_abandoned();

-- A client's tombstones go with it.
CREATE FUNCTION __NS__.forget_abandoned()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM __NS__.abandoned WHERE client = OLD.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER forget_abandoned AFTER DELETE ON __NS__.clients
    FOR EACH ROW EXECUTE FUNCTION __NS__.forget_abandoned();

CREATE OR REPLACE FUNCTION __NS__.find_request(p_client bigint, p_req bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    hold_id bigint;
    tk bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    SELECT id INTO hold_id FROM __NS__.holds WHERE client = p_client AND req = p_req;
    IF FOUND THEN
        RETURN ROW('taken', hold_id, NULL, NULL, NULL, NULL, NULL, 0)::__NS__.outcome;
    END IF;
    SELECT ticket INTO tk FROM __NS__.waiters WHERE client = p_client AND req = p_req;
    IF FOUND THEN
        RETURN __NS__.look(p_client, tk);
    END IF;
    -- The client asks again under another number: this one is dead.
    INSERT INTO __NS__.abandoned VALUES (p_client, p_req) ON CONFLICT DO NOTHING;
    RETURN ROW('gone', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
END
$$;

CREATE OR REPLACE FUNCTION __NS__.abandon_request(p_client bigint, p_req bigint)
RETURNS __NS__.outcome LANGUAGE plpgsql AS $$
DECLARE
    tk bigint;
    hold_id bigint;
    seen boolean := false;
BEGIN
    PERFORM pg_advisory_xact_lock(__KEY__, 0);
    FOR tk IN SELECT ticket FROM __NS__.waiters WHERE client = p_client AND req = p_req LOOP
        seen := true;
        PERFORM __NS__.withdraw(p_client, tk);
    END LOOP;
    FOR hold_id IN SELECT id FROM __NS__.holds WHERE client = p_client AND req = p_req LOOP
        seen := true;
        PERFORM __NS__.release(p_client, hold_id);
    END LOOP;
    IF NOT seen THEN
        INSERT INTO __NS__.abandoned VALUES (p_client, p_req) ON CONFLICT DO NOTHING;
    END IF;
    RETURN ROW('gone', 0, NULL, NULL, NULL, NULL, NULL, NULL)::__NS__.outcome;
END
$$;
