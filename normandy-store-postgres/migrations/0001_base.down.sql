DROP TABLE IF EXISTS normandy_entries;
DROP TABLE IF EXISTS normandy_sessions;
