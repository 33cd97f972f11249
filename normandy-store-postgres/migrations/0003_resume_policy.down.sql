DROP INDEX IF EXISTS normandy_sessions_resumable_idx;
DROP INDEX IF EXISTS normandy_sessions_resumable_owner_idx;
ALTER TABLE normandy_sessions DROP COLUMN IF EXISTS resume_policy;
