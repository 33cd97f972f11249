ALTER TABLE normandy_sessions DROP COLUMN IF EXISTS template;
