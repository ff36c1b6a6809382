"""What ``medserve up`` started, recorded where the commands after it find it.

``medserve up --config site.yaml`` writes the config's path, its storage root, the Ray cluster and the API's URL to
``$XDG_STATE_HOME/medserve/up.json`` (``~/.local/state/medserve/up.json``; the file 0600, its folder 0700): without
``--config`` or ``--address``, ``down`` and ``reload`` act on that application (``down`` drains it through the
storage root its ingress watches), and ``segment`` and ``wsi`` send to its URL. ``down`` forgets it.

Usage::

    record = UpRecord.read()                 # None when nothing was recorded
    config = record.load_config() if record else load_config(None)
    UpRecord.of(config, config_path, host, address, url).write()
    UpRecord.forget()
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.cli.errors import CommandError
from serve_app.config import AppConfig, load_config
from serve_app.storage import private_folder, write_atomic

__all__ = ["UpRecord"]


def _record_file() -> Path:
    # The XDG base-directory rule for state a program keeps between runs.
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "medserve" / "up.json"


class UpRecord(BaseModel):
    """The application ``medserve up`` (or ``reload``) last deployed from this user's account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: Path | None = Field(description="The application YAML it was given, absolute; None: the packaged one.")
    host: str | None = Field(description="Its --host, which overrides the config's http.host; None: not given.")
    address: str | None = Field(description="The Ray cluster it joined (--address); None: the local one.")
    name: str = Field(description="The application's name (its config's `name`).")
    storage_root: Path = Field(description="The application's storage.root: its drain orders and Ray token.")
    url: str = Field(description="The API's base URL.")

    @classmethod
    def of(cls, config: AppConfig, config_path: Path | None, host: str | None, address: str | None, url: str):
        return cls(
            config=None if config_path is None else config_path.resolve(),
            host=host,
            address=address,
            name=config.name,
            storage_root=config.storage.root,
            url=url,
        )

    @classmethod
    def read(cls) -> UpRecord | None:
        """The record, or None where there is none; one that cannot be read is named on stderr and passed over."""
        path = _record_file()
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as e:
            print(f"medserve: passing over {path}, which cannot be read ({type(e).__name__})", file=sys.stderr)
            return None

    def write(self) -> None:
        path = _record_file()
        private_folder(path.parent)
        write_atomic(path, self.model_dump_json(indent=1))

    @staticmethod
    def forget() -> None:
        _record_file().unlink(missing_ok=True)

    def load_config(self) -> AppConfig:
        """The application's config, as ``up`` loaded it; ``ConfigError`` where its file is gone or no longer
        valid, ``CommandError`` where it now names another application or storage root than the one running."""
        config = load_config(self.config, overrides={"http.host": self.host} if self.host else None)
        if not self.describes(config):
            raise CommandError(
                f"{self.config or 'the packaged config'} now names application {config.name!r} with storage.root "
                f"{config.storage.root}, but medserve up started {self.name!r} with {self.storage_root} "
                f"(recorded in {_record_file()}): give --config the file it was started with"
            )
        return config

    def describes(self, config: AppConfig) -> bool:
        """Whether this records the application of ``config``."""
        return (config.name, config.storage.root) == (self.name, self.storage_root)
