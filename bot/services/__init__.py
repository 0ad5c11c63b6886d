"""What the slash commands call: submissions (train, imagine), concepts and their ownership, the gallery of results,
admin actions and members' data (forget). Plain async services over the store and the ledger; no Discord here."""
