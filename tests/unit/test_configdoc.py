from pathlib import Path

from services.configdoc import render

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_matches_the_code() -> None:
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render(), "stale: run python -m services.configdoc > docs/config.md"


def test_every_setting_is_documented_with_its_env_name() -> None:
    text = render()
    for name in ("QLM_REDIS_URL", "QLM_KAFKA_BOOTSTRAP", "QLM_POLICY", "QLM_TIME_SCALE"):
        assert f"`{name}`" in text
