"""Re-classification: `semwatch reprocess` over the ledger or an archive, on this machine or on Ray
(`run` drives it, `work` is what every engine does to one file, `local` and `ray_engine` are the
engines; docs/SCALE-OUT.md)."""
