-- SQL edits for the store fuzzer, one statement per line; {v} is replaced by
-- a random SQL value (NULL, integers at the edges of i64 and u32, reals incl.
-- 9e999 (infinity), timestamps in the far past and future, text, blobs) and
-- {name} by a random limit name. Edits that SQLite rejects are skipped.
-- "LOOSEN" first rebuilds both tables without constraints (as a hand edit
-- with another tool could), so that NULLs, wrong types and duplicates fit.
LOOSEN
PRAGMA ignore_check_constraints = ON
UPDATE limits SET "limit" = {v} WHERE name = {name}
UPDATE limits SET active = {v} WHERE name = {name}
UPDATE limits SET slot_decay_per_second = {v} WHERE name = {name}
UPDATE limits SET reset_count = {v} WHERE name = {name}
UPDATE limits SET revision = {v} WHERE name = {name}
UPDATE limits SET name = {v} WHERE name = {name}
UPDATE slot_state SET held_slots = {v} WHERE name = {name}
UPDATE slot_state SET decaying_slots = {v} WHERE name = {name}
UPDATE slot_state SET decaying_at = {v} WHERE name = {name}
UPDATE slot_state SET denied_slots = {v} WHERE name = {name}
UPDATE slot_state SET avg_slot_occupancy_seconds = {v} WHERE name = {name}
UPDATE slot_state SET waiters = {v} WHERE name = {name}
UPDATE slot_state SET name = {v} WHERE name = {name}
UPDATE slot_state SET decaying_at = {v}
UPDATE slot_state SET decaying_slots = {v}
INSERT INTO limits (name, "limit", active, slot_decay_per_second) VALUES ({v}, {v}, {v}, {v})
INSERT INTO slot_state (name, held_slots, decaying_slots, decaying_at, denied_slots, avg_slot_occupancy_seconds, waiters) VALUES ({name}, {v}, {v}, {v}, {v}, {v}, {v})
INSERT INTO limits SELECT * FROM limits
INSERT INTO slot_state SELECT * FROM slot_state
DELETE FROM limits WHERE name = {name}
DELETE FROM slot_state WHERE name = {name}
DELETE FROM meta
UPDATE meta SET value = {v}
DROP TABLE slot_state
DROP TABLE meta
DROP TABLE limits
ALTER TABLE limits DROP COLUMN reset_count
ALTER TABLE limits DROP COLUMN revision
ALTER TABLE slot_state DROP COLUMN waiters
ALTER TABLE limits ADD COLUMN extra TEXT DEFAULT {v}
ALTER TABLE limits RENAME TO limits_old
CREATE TABLE limits (x)
CREATE VIEW IF NOT EXISTS v_limits AS SELECT * FROM limits
CREATE INDEX IF NOT EXISTS by_limit ON limits ("limit")
CREATE TRIGGER IF NOT EXISTS no_save BEFORE UPDATE ON slot_state BEGIN SELECT RAISE(ABORT, 'no'); END
CREATE TRIGGER IF NOT EXISTS no_insert BEFORE INSERT ON limits BEGIN SELECT RAISE(ABORT, 'no'); END
CREATE TRIGGER IF NOT EXISTS no_delete BEFORE DELETE ON limits BEGIN SELECT RAISE(FAIL, 'no'); END
PRAGMA user_version = {v}
PRAGMA application_id = {v}
PRAGMA journal_mode = DELETE
PRAGMA journal_mode = WAL
PRAGMA page_size = 512; VACUUM
PRAGMA auto_vacuum = FULL; VACUUM
