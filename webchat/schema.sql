-- webchat's store, version 1 (see MIGRATIONS in store.py: a later change is a new file).
-- Times are Unix seconds (DOUBLE PRECISION: SQLite gives it REAL affinity, and
-- PostgreSQL's REAL is too coarse for them). Ids are unguessable random strings.
-- The SQL serves SQLite and PostgreSQL alike; a line `-- @sqlite`, `-- @postgresql`
-- or `-- @both` starts a part for one of them (or both again).
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,              -- "s:<session id>" or "u:<signed-in user>"
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    temperature DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated_at DESC);

CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,        -- order within the conversation
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    -- pending -> streaming -> complete | stopped | error | interrupted
    status TEXT NOT NULL DEFAULT 'complete',
    error TEXT NOT NULL DEFAULT '',
    finish_reason TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    request_key TEXT,                 -- the composer's one-time key: a retried POST is one turn
    owner TEXT NOT NULL DEFAULT '',   -- the conversation's owner, for limits across conversations
    client_addr TEXT NOT NULL DEFAULT '',  -- who sent it, for limits per address
    worker_id TEXT,                   -- the worker whose run generates this reply
    stop_requested INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    first_token_ms INTEGER,
    tokens_per_second DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    UNIQUE (conversation_id, position),
    UNIQUE (conversation_id, request_key)
);
CREATE INDEX IF NOT EXISTS messages_status ON messages (status) WHERE status IN ('pending', 'streaming');
CREATE INDEX IF NOT EXISTS messages_owner_time ON messages (owner, created_at);
CREATE INDEX IF NOT EXISTS messages_addr_time ON messages (client_addr, created_at);

-- One row per live gunicorn worker; a stale heartbeat means the worker died.
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    heartbeat_at DOUBLE PRECISION NOT NULL
);

-- @sqlite
-- Full-text search over one's conversations: user messages and finished replies.
-- A plain FTS5 table holding its own copy (not external content), so deleting a
-- row that was never indexed cannot corrupt the index. The trigram tokenizer
-- finds substrings in any language, Chinese included.
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
    content, message_id UNINDEXED, tokenize = 'trigram'
);
CREATE TRIGGER IF NOT EXISTS messages_fts_user AFTER INSERT ON messages
    WHEN new.role = 'user'
BEGIN
    INSERT INTO messages_fts (content, message_id) VALUES (new.content, new.id);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_edit AFTER UPDATE OF content ON messages
    WHEN new.role = 'user'
BEGIN
    DELETE FROM messages_fts WHERE message_id = old.id;
    INSERT INTO messages_fts (content, message_id) VALUES (new.content, new.id);
END;
-- Replies are indexed once, when they finish (not at every checkpoint).
CREATE TRIGGER IF NOT EXISTS messages_fts_reply AFTER UPDATE OF status ON messages
    WHEN new.role = 'assistant'
BEGIN
    DELETE FROM messages_fts WHERE message_id = old.id;
    INSERT INTO messages_fts (content, message_id)
        SELECT new.content, new.id
        WHERE new.status IN ('complete', 'stopped', 'error', 'interrupted') AND new.content != '';
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages
BEGIN
    DELETE FROM messages_fts WHERE message_id = old.id;
END;

-- @postgresql
-- Full-text search over one's conversations: user messages and finished replies,
-- copied into their own table (so a checkpoint of a streaming reply touches no
-- index of it) with a trigram index, which serves ILIKE '%…%' in any language.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE TABLE IF NOT EXISTS messages_search (
    message_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    content TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_search_content ON messages_search
    USING gin (content gin_trgm_ops);
CREATE OR REPLACE FUNCTION webchat_index_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM messages_search WHERE message_id = NEW.id;
    IF NEW.role = 'user' OR (NEW.status IN ('complete', 'stopped', 'error', 'interrupted')
                             AND NEW.content <> '') THEN
        INSERT INTO messages_search (message_id, content) VALUES (NEW.id, NEW.content);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS messages_search_insert ON messages;
CREATE TRIGGER messages_search_insert AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION webchat_index_message();
-- As in SQLite: a user message when its text is edited, a reply when its status
-- changes (indexed once it has finished, not at every checkpoint).
DROP TRIGGER IF EXISTS messages_search_update ON messages;
CREATE TRIGGER messages_search_update AFTER UPDATE OF content, status ON messages
    FOR EACH ROW
    WHEN ((NEW.role = 'user' AND OLD.content IS DISTINCT FROM NEW.content)
          OR (NEW.role = 'assistant' AND OLD.status IS DISTINCT FROM NEW.status))
    EXECUTE FUNCTION webchat_index_message();

-- Every change of a reply (checkpoint, end, stop, interruption) is announced with
-- its id, at commit, to the instances that LISTEN (store.changes): their tails of
-- a reply generated elsewhere wake at once instead of polling.
CREATE OR REPLACE FUNCTION webchat_notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('webchat_messages', NEW.id);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS messages_notify ON messages;
CREATE TRIGGER messages_notify AFTER UPDATE ON messages
    FOR EACH ROW WHEN (NEW.role = 'assistant') EXECUTE FUNCTION webchat_notify_message();
