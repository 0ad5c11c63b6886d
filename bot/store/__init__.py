"""The SQLite database: one aiosqlite connection (WAL, foreign keys) and the migrations in migrations/NNNN_*.sql."""
