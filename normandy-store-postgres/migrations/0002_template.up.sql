-- Normandy session store, stage 2: the session's configuration template.
--
-- Versioned MessagePack (normandy_core::codec) of a ConfigTemplate: non-secret by construction
-- (credential names, never credentials). Nullable: sessions created without a template, or
-- before this migration, have none.
ALTER TABLE normandy_sessions ADD COLUMN template bytea;
