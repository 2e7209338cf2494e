"""Settings: `config.toml` loaded into one frozen, typed object (`load_settings` → `Settings`).

`sections` holds one frozen dataclass per table and the checks of its values; `loading` reads the
file, the environment and overrides into them. Precedence: built-in defaults < config file <
`SEMWATCH_<SECTION>_<KEY>` environment variables. Everything else imports from here.
"""

from __future__ import annotations

from semwatch.config.loading import (
    CONFIG_ENV,
    DATA_ENV,
    ENV_PREFIX,
    default_config_path,
    iter_setting_names,
    load_settings,
)
from semwatch.config.sections import (
    SECTION_TYPES,
    DataSettings,
    ExpectRule,
    FleetSettings,
    InstrumentSettings,
    LifecycleSettings,
    LiveSettings,
    LoggingSettings,
    MetricsSettings,
    ModelSettings,
    NotifySettings,
    QualitySettings,
    ReadingSettings,
    ReportSettings,
    SampleSettings,
    ScaleSettings,
    Settings,
    StoreSettings,
    TilingSettings,
    TrainSettings,
    WatchSettings,
    is_loopback,
    listen_address,
)

__all__ = [
    "CONFIG_ENV",
    "DATA_ENV",
    "ENV_PREFIX",
    "SECTION_TYPES",
    "DataSettings",
    "ExpectRule",
    "FleetSettings",
    "InstrumentSettings",
    "LifecycleSettings",
    "LiveSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ModelSettings",
    "NotifySettings",
    "QualitySettings",
    "ReadingSettings",
    "ReportSettings",
    "SampleSettings",
    "ScaleSettings",
    "Settings",
    "StoreSettings",
    "TilingSettings",
    "TrainSettings",
    "WatchSettings",
    "default_config_path",
    "is_loopback",
    "iter_setting_names",
    "listen_address",
    "load_settings",
]
