"""The daemon: watcher → settle gate → pipeline (readers, one inference thread) → the single
writer, with liveness, systemd notification, logs and the nightly report scheduler."""
