"""No engine can build the image here; check the Dockerfile's key properties."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()


def test_multi_stage_non_root_without_build_tools():
    stages = [line for line in DOCKERFILE.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and " AS build" in stages[0]
    final = DOCKERFILE[DOCKERFILE.rindex("FROM "):]
    assert "USER 10001" in final and "COPY --from=build /opt/epd /opt/epd" in final
    assert "pip install" not in final and "apt-get" not in final
    assert 'ENTRYPOINT ["epd"]' in final
