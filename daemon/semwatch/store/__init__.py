"""The store: the SQLite ledger (schema and migrations, the single writer, read-only snapshots),
sample verdicts and every CSV file semwatch writes. A new output table or CSV column goes here."""
