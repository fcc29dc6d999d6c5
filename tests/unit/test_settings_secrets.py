"""Settings from files (QLM_SECRETS_DIR): how containers get their passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlm.core.errors import InvalidInput
from services.common.settings import SECRETS_DIR_ENV, CommonSettings, load_settings


@pytest.fixture(autouse=True)
def _no_qlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("QLM_")]:
        monkeypatch.delenv(key)


def test_files_named_as_the_variables_are_read_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "QLM_REDIS_URL").write_text("redis://qlm-ingest:pw@redis:6379/0")
    (tmp_path / "QLM_KAFKA_SASL_PASSWORD").write_text("kafka-pw")
    (tmp_path / "QLM_KAFKA_SASL_USERNAME").write_text("qlm-ingest")
    (tmp_path / "QLM_KAFKA_SECURITY_PROTOCOL").write_text("SASL_PLAINTEXT")
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path))
    settings = load_settings(CommonSettings, [])
    assert settings.redis_url == "redis://qlm-ingest:pw@redis:6379/0"
    assert settings.kafka_auth().password == "kafka-pw"
    monkeypatch.setenv("QLM_REDIS_URL", "redis://other:6379/0")
    assert load_settings(CommonSettings, []).redis_url == "redis://other:6379/0"
    assert load_settings(CommonSettings, ["--redis-url", "redis://flag:1/0"]).redis_url == (
        "redis://flag:1/0")


def test_a_bad_value_in_a_file_is_named_like_any_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "QLM_KAFKA_SECURITY_PROTOCOL").write_text("SSL-ish")
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path))
    with pytest.raises(InvalidInput) as caught:
        load_settings(CommonSettings, [])
    assert caught.value.field == "kafka_security_protocol"


def test_a_missing_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(InvalidInput) as caught:
        load_settings(CommonSettings, [])
    assert caught.value.field == SECRETS_DIR_ENV
