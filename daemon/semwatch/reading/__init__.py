"""Reading: a file from the export folder → a `values.Micrograph` (pixels, metadata, quality) and
the tiles the model sees. A new vendor format or sidecar goes here (vendor.py, sidecar.py, and the
format sniffing in micrograph.py); nothing here knows the model, the database or the daemon."""
