-- Migration 2: the search index keyed by the message's rowid.
-- Why: its triggers deleted by message_id, a column FTS5 cannot index, so every
-- status change of a reply (claim, finish) scanned the whole index.

-- @sqlite
DROP TRIGGER IF EXISTS messages_fts_user;
DROP TRIGGER IF EXISTS messages_fts_edit;
DROP TRIGGER IF EXISTS messages_fts_reply;
DROP TRIGGER IF EXISTS messages_fts_delete;
DROP TABLE IF EXISTS messages_fts;
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content, message_id UNINDEXED, tokenize = 'trigram'
);
INSERT INTO messages_fts (rowid, content, message_id)
    SELECT rowid, content, id FROM messages
    WHERE role = 'user'
       OR (status IN ('complete', 'stopped', 'error', 'interrupted') AND content != '');
CREATE TRIGGER messages_fts_user AFTER INSERT ON messages
    WHEN new.role = 'user'
BEGIN
    INSERT INTO messages_fts (rowid, content, message_id) VALUES (new.rowid, new.content, new.id);
END;
CREATE TRIGGER messages_fts_edit AFTER UPDATE OF content ON messages
    WHEN new.role = 'user'
BEGIN
    DELETE FROM messages_fts WHERE rowid = old.rowid;
    INSERT INTO messages_fts (rowid, content, message_id) VALUES (new.rowid, new.content, new.id);
END;
-- Replies are indexed once, when they finish (not at every checkpoint).
CREATE TRIGGER messages_fts_reply AFTER UPDATE OF status ON messages
    WHEN new.role = 'assistant' AND old.status != new.status
BEGIN
    DELETE FROM messages_fts WHERE rowid = old.rowid;
    INSERT INTO messages_fts (rowid, content, message_id)
        SELECT new.rowid, new.content, new.id
        WHERE new.status IN ('complete', 'stopped', 'error', 'interrupted') AND new.content != '';
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
BEGIN
    DELETE FROM messages_fts WHERE rowid = old.rowid;
END;

-- @postgresql
-- Nothing to change: messages_search is keyed by message_id, its primary key.
SELECT 1;
