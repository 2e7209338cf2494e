"""The day's report (HTML page, images.csv, samples.csv) from the read-only database; written on
demand (`semwatch report`) and by the daemon's nightly scheduler."""
