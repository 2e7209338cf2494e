"""The settings' sections: one frozen dataclass per `config.toml` table, each checking its own values.

Every field below must appear, commented, in the top-level `config.toml` (a test checks this).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from semwatch.errors import ConfigError


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class DataSettings:
    # Labelled NCM folder used by `semwatch demo` and the benchmarks.
    ncm_dir: Path = Path("../shared/data/ncm-sem")
    # Vendor TIFF folder (foreign specimens for the unknown-detection checks).
    vendor_dir: Path = Path("../shared/data/vendor-tiff")


@dataclass(frozen=True)
class WatchSettings:
    folder: Path = Path("var/incoming")
    mode: Literal["auto", "inotify", "polling"] = "auto"
    recursive: bool = True
    include: tuple[str, ...] = ("*.tif", "*.tiff", "*.jpg", "*.jpeg", "*.png", "*.bmp")
    exclude: tuple[str, ...] = (".*", "*.tmp", "*.part", "*.partial", "*~", "*.txt")
    settle_seconds: float = 2.0
    rescan_seconds: float = 60.0
    poll_interval_seconds: float = 1.0
    sidecar_wait_seconds: float = 10.0
    max_attempts: int = 4
    retry_backoff_seconds: float = 5.0
    reader_threads: int = 2
    stop_timeout_seconds: float = 8.0
    follow_symlinks: Literal["inside", "never", "always"] = "inside"
    read_timeout_seconds: float = 60.0
    watch_depth: int = 32
    stuck_seconds: float = 90.0

    def validate(self) -> None:
        _non_negative("[watch] settle_seconds", self.settle_seconds)
        _positive("[watch] rescan_seconds", self.rescan_seconds)
        _positive("[watch] poll_interval_seconds", self.poll_interval_seconds)
        _non_negative("[watch] sidecar_wait_seconds", self.sidecar_wait_seconds)
        _positive("[watch] max_attempts", self.max_attempts)
        _non_negative("[watch] retry_backoff_seconds", self.retry_backoff_seconds)
        _positive("[watch] reader_threads", self.reader_threads)
        _positive("[watch] stop_timeout_seconds", self.stop_timeout_seconds)
        _positive("[watch] read_timeout_seconds", self.read_timeout_seconds)
        _non_negative("[watch] watch_depth", self.watch_depth)
        _positive("[watch] stuck_seconds", self.stuck_seconds)


@dataclass(frozen=True)
class StoreSettings:
    database: Path = Path("var/semwatch.db")
    results_csv: Path = Path("var/results.csv")
    busy_timeout_ms: int = 10000
    write_retry_seconds: float = 300.0

    def validate(self) -> None:
        _positive("[store] busy_timeout_ms", self.busy_timeout_ms)
        _positive("[store] write_retry_seconds", self.write_retry_seconds)


@dataclass(frozen=True)
class ReadingSettings:
    max_pixels: int = 200_000_000
    max_file_mb: float = 2048.0
    max_decoded_mb: float = 1024.0
    databar_rows: int = -1

    def validate(self) -> None:
        _positive("[reading] max_pixels", self.max_pixels)
        _positive("[reading] max_file_mb", self.max_file_mb)
        _positive("[reading] max_decoded_mb", self.max_decoded_mb)
        if self.databar_rows < -1:
            raise ConfigError(f"[reading] databar_rows must be -1 (auto) or >= 0, got {self.databar_rows}")


@dataclass(frozen=True)
class QualitySettings:
    # Tuned on the shared data: real images score focus >= 0.094 (Zeiss BSD at 10k x; NCM >= 0.2), NCM
    # images blurred with a Gaussian of sigma 3 px <= 0.066; SNE pristine sessions clip up to 44 % of
    # pixels to black.
    focus_min: float = 0.06
    saturated_max: float = 0.6
    dynamic_range_min: float = 0.08
    blank_std_min: float = 0.01
    streak_rows_max: float = 0.03
    tear_rows_max: float = 0.02
    blockiness_max: float = 1.8
    noise_max: float = 0.08

    def validate(self) -> None:
        _fraction("[quality] streak_rows_max", self.streak_rows_max)
        _fraction("[quality] tear_rows_max", self.tear_rows_max)
        if not self.blockiness_max >= 1.0:
            raise ConfigError(
                f"[quality] blockiness_max must be >= 1 (1 = no block pattern), got {self.blockiness_max}"
            )
        _fraction("[quality] noise_max", self.noise_max)
        _fraction("[quality] focus_min", self.focus_min)
        _fraction("[quality] saturated_max", self.saturated_max)
        _fraction("[quality] dynamic_range_min", self.dynamic_range_min)
        _fraction("[quality] blank_std_min", self.blank_std_min)


@dataclass(frozen=True)
class TilingSettings:
    tile_px: int = 288
    tile_physical_px: int = 672
    overlap: float = 0.25
    max_tiles: int = 48
    tile_std_min: float = 0.02
    tile_saturated_max: float = 0.7
    max_scale_ratio: float = 4.0
    intensity: Literal["equalize", "standardize", "none"] = "equalize"

    def validate(self) -> None:
        _positive("[tiling] tile_px", self.tile_px)
        if self.max_scale_ratio < 1.0:
            raise ConfigError(f"[tiling] max_scale_ratio must be >= 1, got {self.max_scale_ratio}")
        _positive("[tiling] tile_physical_px", self.tile_physical_px)
        if not 0.0 <= self.overlap < 0.9:
            raise ConfigError(f"[tiling] overlap must be in [0, 0.9), got {self.overlap}")
        _positive("[tiling] max_tiles", self.max_tiles)
        _non_negative("[tiling] tile_std_min", self.tile_std_min)
        _fraction("[tiling] tile_saturated_max", self.tile_saturated_max)


@dataclass(frozen=True)
class ModelSettings:
    path: Path = Path("models/ncm")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    architecture: str = "efficientnet-lite0"
    batch_size: int = 32
    max_batch_latency_ms: float = 200.0
    mixed_precision: bool = True
    cpu_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    cpu_threads: int = 0
    unknown_threshold: float = -1.0
    min_confidence: float = 0.9
    min_tiles: int = 2
    test_time_views: int = 8
    test_time_below: float = 0.9
    reprocess_outdated: bool = False
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    # The model registry (issue 20, model/registry.py): None = off, `path` is the model.
    registry: Path | None = None
    shadow: str = ""  # a registry alias or model id also run on new images; "" = none

    def validate(self) -> None:
        _positive("[model] batch_size", self.batch_size)
        if self.shadow and self.registry is None:
            raise ConfigError("[model] shadow needs [model] registry (it names a model in the registry)")
        if self.test_time_views not in (1, 2, 4, 8):
            raise ConfigError(f"[model] test_time_views must be 1, 2, 4 or 8, not {self.test_time_views}")
        _fraction("[model] test_time_below", self.test_time_below)
        _non_negative("[model] max_batch_latency_ms", self.max_batch_latency_ms)
        _non_negative("[model] cpu_threads", self.cpu_threads)
        _fraction("[model] min_confidence", self.min_confidence)
        _positive("[model] min_tiles", self.min_tiles)


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 1234
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    epochs: int = 60
    patience: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    augment_copies: int = 1  # 2 until 2026-11-26: one fewer backbone pass per training tile
    tiles_per_image: int = 16
    class_map: dict[str, str] = field(default_factory=dict)
    labels: bool = False  # `semwatch train` also takes the ledger's labelled images (as --labels)
    cache_features: bool = True  # backbone features kept by content (model.train.featurecache)
    # How the unknown threshold is calibrated on the validation images (model.train.detector):
    # "robust" (median and MAD of their log novelty: the odd few do not move it) or "quantile".
    unknown_calibration: Literal["robust", "quantile"] = "robust"
    unknown_spread: float = 6.0  # robust: MADs above the median
    unknown_quantile: float = 0.99  # quantile: this quantile times unknown_margin
    unknown_margin: float = 1.2
    # "frozen": a head on cached features; "finetune": then the whole backbone end to end; "auto":
    # fine-tune on CUDA, frozen on a CPU (two cores cannot fine-tune within the training budget).
    backbone: Literal["frozen", "finetune", "auto"] = "auto"
    finetune_epochs: int = 8
    finetune_learning_rate: float = 1e-4

    def validate(self) -> None:
        _fraction("[train] val_fraction", self.val_fraction)
        _positive("[train] finetune_epochs", self.finetune_epochs)
        _positive("[train] finetune_learning_rate", self.finetune_learning_rate)
        _fraction("[train] unknown_quantile", self.unknown_quantile)
        _positive("[train] unknown_spread", self.unknown_spread)
        if self.unknown_margin < 1.0:
            raise ConfigError(f"[train] unknown_margin must be >= 1, got {self.unknown_margin}")
        _fraction("[train] test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError("[train] val_fraction + test_fraction must be < 0.9")
        _positive("[train] epochs", self.epochs)
        _positive("[train] patience", self.patience)
        _positive("[train] batch_size", self.batch_size)
        _positive("[train] learning_rate", self.learning_rate)
        _non_negative("[train] weight_decay", self.weight_decay)
        _non_negative("[train] augment_copies", self.augment_copies)
        _positive("[train] tiles_per_image", self.tiles_per_image)


@dataclass(frozen=True)
class LifecycleSettings:
    """The promotion gate (issue 20, semwatch.lifecycle.gate)."""

    eval_folder: Path | None = None  # the lab's frozen evaluation folder (class folders); None = none
    alpha: float = 0.05
    min_class_images: int = 10
    # Automation, off by default (semwatch.lifecycle.retrain): a challenger trained after this many
    # new labels, at the nightly report time; 0 = never by itself.
    retrain_after_labels: int = 0
    auto_promote: bool = False  # promote such a challenger when the gate says "better"
    train_folder: Path | None = None  # class folders trained beside the labels; None = the champion's
    retrain_timeout_minutes: float = 180.0

    def validate(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ConfigError(f"[lifecycle] alpha must be between 0 and 0.5, got {self.alpha}")
        _positive("[lifecycle] min_class_images", self.min_class_images)
        _non_negative("[lifecycle] retrain_after_labels", self.retrain_after_labels)
        _positive("[lifecycle] retrain_timeout_minutes", self.retrain_timeout_minutes)


@dataclass(frozen=True)
class ExpectRule:
    """One `[[samples.expect]]` entry: samples whose id matches `pattern` should be `class`."""

    pattern: str
    expected_class: str


@dataclass(frozen=True)
class SampleSettings:
    key: Literal["parent", "regex", "metadata"] = "parent"
    regex: str = r"^(?P<sample>[^_ ]+)"
    metadata_field: str = "session"
    pass_confidence: float = 0.8
    min_uniformity: float = 0.8
    expect: tuple[ExpectRule, ...] = ()

    def validate(self) -> None:
        _fraction("[samples] pass_confidence", self.pass_confidence)
        _fraction("[samples] min_uniformity", self.min_uniformity)
        if self.key == "regex":
            import re

            try:
                compiled = re.compile(self.regex)
            except re.error as exc:
                raise ConfigError(f"[samples] regex is not a valid regular expression: {exc}") from None
            if "sample" not in compiled.groupindex:
                raise ConfigError("[samples] regex needs a named group (?P<sample>...)")


@dataclass(frozen=True)
class ReportSettings:
    folder: Path = Path("reports")
    enabled: bool = True
    time: str = "23:55"
    timezone: str = "UTC"
    catch_up_days: int = 7
    thumbnails: int = 12

    def validate(self) -> None:
        parts = self.time.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"[report] time must be HH:MM, got {self.time!r}")
        hour, minute = int(parts[0]), int(parts[1])
        if not (0 <= hour < 24 and 0 <= minute < 60):
            raise ConfigError(f"[report] time must be HH:MM, got {self.time!r}")
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"[report] timezone is not a known time zone: {self.timezone!r}") from None
        _non_negative("[report] catch_up_days", self.catch_up_days)
        _non_negative("[report] thumbnails", self.thumbnails)


@dataclass(frozen=True)
class LiveSettings:
    refresh_per_second: float = 4.0
    recent_rows: int = 12
    stale_seconds: float = 120.0

    def validate(self) -> None:
        _positive("[live] refresh_per_second", self.refresh_per_second)
        _positive("[live] recent_rows", self.recent_rows)
        _positive("[live] stale_seconds", self.stale_seconds)


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    per_file_lines: int = 20
    summary_seconds: float = 10.0

    def validate(self) -> None:
        _non_negative("[logging] per_file_lines", self.per_file_lines)
        _positive("[logging] summary_seconds", self.summary_seconds)


NotifyEvent = Literal["sample_fail", "sample_uncertain", "daemon_degraded", "unknown_spike", "report_ready",
                      "challenger_ready", "model_promoted"]


@dataclass(frozen=True)
class NotifySettings:
    urls: tuple[str, ...] = ()
    on: tuple[NotifyEvent, ...] = get_args(NotifyEvent)
    poll_seconds: float = 1.0
    sample_quiet_seconds: float = 5.0
    unknown_window: int = 50
    unknown_share: float = 0.3
    dedup_seconds: float = 3600.0
    timeout_seconds: float = 10.0
    retries: int = 3
    queue_size: int = 100

    def validate(self) -> None:
        for i, url in enumerate(self.urls):
            if "://" not in url:  # apprise itself checks the rest when the daemon starts
                raise ConfigError(f"[notify] urls[{i}] is not an apprise URL (scheme://...)")
        _positive("[notify] poll_seconds", self.poll_seconds)
        _non_negative("[notify] sample_quiet_seconds", self.sample_quiet_seconds)
        _positive("[notify] unknown_window", self.unknown_window)
        _fraction("[notify] unknown_share", self.unknown_share)
        _non_negative("[notify] dedup_seconds", self.dedup_seconds)
        _positive("[notify] timeout_seconds", self.timeout_seconds)
        _non_negative("[notify] retries", self.retries)
        _positive("[notify] queue_size", self.queue_size)


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = ""
    allow_remote: bool = False

    def validate(self) -> None:
        if self.listen:
            host, _ = listen_address(self.listen)
            if not self.allow_remote and not is_loopback(host):
                raise ConfigError(f"[metrics] listen = {self.listen!r} is not a loopback address and the "
                                  "endpoint has no authentication: set [metrics] allow_remote = true to "
                                  "serve it beyond this machine")

    def address(self) -> tuple[str, int] | None:
        """(host, port) to serve on; None when metrics are off."""
        return listen_address(self.listen) if self.listen else None


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def listen_address(text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" → (host, port); ConfigError naming `[metrics] listen` otherwise.
    The host is an IPv4 address, a bracketed IPv6 address or a host name: `::9464` (an IPv6
    address without brackets and port), `host:`, `:9464`, `[::1` are refused here, at load, not
    when the daemon starts serving."""
    bad = ConfigError("[metrics] listen must be host:port or [ipv6]:port (e.g. 127.0.0.1:9464), "
                      f"got {text!r}")
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise bad
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = text.partition(":")
        if not sep or ":" in port:
            raise bad
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if host.split(".")[-1].isdigit() or not all(_HOST_LABEL.fullmatch(x) for x in host.split(".")):
                raise bad from None
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad
    return host, int(port)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost"; any other name may resolve anywhere, so it is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ScaleSettings:
    """`semwatch reprocess`: which engine classifies, and the Ray cluster's shape (docs/SCALE-OUT.md)."""

    engine: Literal["local", "ray"] = "local"
    ray_address: str = ""
    workers: int = 0
    gpus_per_worker: float = -1.0
    cpus_per_reader: float = 1.0
    cpus_per_worker: float = 1.0

    def validate(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ConfigError(f'[scale] engine must be "local" or "ray", not {self.engine!r}')
        _non_negative("[scale] workers", self.workers)
        if self.gpus_per_worker != -1.0:
            _non_negative("[scale] gpus_per_worker", self.gpus_per_worker)
        if self.cpus_per_reader <= 0:
            raise ConfigError(f"[scale] cpus_per_reader must be > 0, not {self.cpus_per_reader}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"[scale] cpus_per_worker must be > 0, not {self.cpus_per_worker}")


@dataclass(frozen=True)
class InstrumentSettings:
    """Which microscope this daemon serves (docs/FLEET.md): stamped on the database, rows, metrics."""

    name: str = ""  # empty: this computer's host name
    site: str = ""

    def validate(self) -> None:
        for key, value in (("name", self.name), ("site", self.site)):
            if len(value) > 64 or any(not (c.isprintable() and c not in '"\\{}') for c in value):
                raise ConfigError(f"[instrument] {key} must be at most 64 printable characters "
                                  f"without quotes, backslashes or braces, got {value!r}")

    def resolved_name(self) -> str:
        import socket

        return self.name or socket.gethostname()


@dataclass(frozen=True)
class FleetSettings:
    """Snapshots for a fleet view (`semwatch fleet`): where, how often, how many kept."""

    export_folder: Path | None = None
    export_minutes: float = 5.0
    keep: int = 3
    export_timeout_seconds: float = 60.0
    stale_seconds: float = 600.0

    def validate(self) -> None:
        _positive("[fleet] export_minutes", self.export_minutes)
        _positive("[fleet] keep", self.keep)
        _positive("[fleet] export_timeout_seconds", self.export_timeout_seconds)
        _positive("[fleet] stale_seconds", self.stale_seconds)


@dataclass(frozen=True)
class Settings:
    data: DataSettings = field(default_factory=DataSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    reading: ReadingSettings = field(default_factory=ReadingSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    tiling: TilingSettings = field(default_factory=TilingSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    samples: SampleSettings = field(default_factory=SampleSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    scale: ScaleSettings = field(default_factory=ScaleSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    instrument: InstrumentSettings = field(default_factory=InstrumentSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    # Where the settings came from (for messages); not a config key.
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})

    def replace(self, **sections: Any) -> Settings:
        """A copy with some sections replaced (tests and the demo build variants this way)."""
        return dataclasses.replace(self, **sections)


SECTION_TYPES: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else type(getattr(Settings(), f.name))
    for f in dataclasses.fields(Settings)
    if not f.metadata.get("internal")
}
