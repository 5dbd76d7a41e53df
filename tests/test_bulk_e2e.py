"""Bulk features end to end: the cost limit, reported charges, plan and schema commands."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from run_helpers import CANARY, fast_settings

from veobatch.cli import main
from veobatch.ledger import load_states
from veobatch.manifest import load_manifest
from veobatch.schema import manifest_schema, schema_text
from veobatch.session import run
from veobatch.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent
T2V = "google/veo-3.1-t2v"
I2V = "google/veo-3.1-i2v-fast"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimConfig(
        api_keys=frozenset({CANARY}), gen_time_mean_s=0.2, gen_time_spread=0.2, video_mode="tiny"
    )
    async with Simulator(config) as s:
        yield s


def five_jobs(tmp: Path) -> Path:
    jobs = "".join(f"  - {{id: j{i}, prompt: scene {i}}}\n" for i in range(5))
    path = tmp / "m.yaml"
    path.write_text(f"version: 1\ndefaults: {{model: {T2V}, duration: 4}}\njobs:\n{jobs}")
    return path  # five jobs of 4 s at $0.40/s: $1.60 each


async def test_the_cost_limit_holds_back_what_does_not_fit(sim: Simulator, tmp_path: Path) -> None:
    m = load_manifest(five_jobs(tmp_path))
    out = tmp_path / "out"
    report = await run(m, fast_settings(out, sim.base_url, max_cost_usd=5.0))
    assert sim.stats.creates_ok == 3  # 3 x $1.60 = $4.80; a 4th would be $6.40
    assert report.counts["done"] == 3 and report.over_budget == ["j3", "j4"]
    assert report.pending == [] and report.exit_code == 1
    assert report.estimated_usd == pytest.approx(4.8)
    # The simulator charges on completion and says so in x-aimlapi-usd-spent.
    assert report.reported_jobs == 3 and report.reported_usd == pytest.approx(4.8)
    states = load_states(out)
    assert states["j0"].usd_estimate == pytest.approx(1.6)
    assert states["j0"].usd_spent == pytest.approx(1.6)
    assert "j3" not in states  # never submitted: nothing recorded
    results = json.loads((out / "results.json").read_text())
    assert results["jobs"][0]["usd_spent"] == pytest.approx(1.6)

    again = await run(m, fast_settings(out, sim.base_url, max_cost_usd=5.0))
    assert sim.stats.creates_ok == 5  # the limit is per run: the 2 left now fit ($3.20)
    assert again.over_budget == [] and again.exit_code == 0


async def test_a_zero_limit_submits_nothing(sim: Simulator, tmp_path: Path) -> None:
    m = load_manifest(five_jobs(tmp_path))
    report = await run(m, fast_settings(tmp_path / "out", sim.base_url, max_cost_usd=0.0))
    assert sim.stats.creates_ok == 0 and len(report.over_budget) == 5


def test_plan_shows_standing_cost_per_model_and_the_limit(tmp_path: Path) -> None:
    path = five_jobs(tmp_path)
    text = path.read_text().replace(
        "jobs:\n", "settings:\n  prices: {google/veo-3.1-t2v-fast: 0.1}\njobs:\n"
    )
    path.write_text(text + "  - {id: quick, model: google/veo-3.1-t2v-fast, prompt: q}\n")
    res = CliRunner().invoke(main, ["plan", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "6 jobs: 6 new" in res.stdout
    assert "would submit 6 generations, about $8.40" in res.stdout
    lines = [" ".join(line.split()) for line in res.stdout.splitlines()]
    assert "veo-3.1-t2v 5 20 0.40 8.00" in lines
    assert "veo-3.1-t2v-fast 1 4 0.10* 0.40" in lines  # * overridden in settings.prices
    assert "total 6 24 8.40" in lines
    res = CliRunner().invoke(
        main, ["plan", str(path), "--out", str(tmp_path / "o"), "--max-cost", "4"]
    )
    assert "cost limit $4.00: 3 jobs (about $4.80) held back: j2, j3, j4" in res.stdout


def test_schema_command_matches_the_committed_copy() -> None:
    res = CliRunner().invoke(main, ["schema"])
    assert res.exit_code == 0
    assert res.stdout == schema_text()
    assert (ROOT / "jobs" / "manifest.schema.json").read_text() == schema_text(), (
        "regenerate: veobatch schema > jobs/manifest.schema.json"
    )


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_carry_the_schema_comment_validate_and_load(path: Path) -> None:
    text = path.read_text()
    assert "# yaml-language-server: $schema=manifest.schema.json" in text.splitlines()[0]
    jsonschema.Draft202012Validator(manifest_schema()).validate(yaml.safe_load(text))
    assert load_manifest(path).jobs


@pytest.mark.parametrize(
    "job",
    [
        {"model": T2V, "prompt": "p", "aspect_ration": "16:9"},  # misspelt
        {"model": "google/veo-3.1-i2v", "prompt": "p", "image_url": "a.png", "seed": 1},
        {"model": "google/veo-3.1-reference-to-video", "prompt": "p", "duration": 4},
        {"model": T2V, "prompt": "p", "variants": 0},
        {"model": T2V, "prompt": ""},
    ],
)
def test_the_schema_rejects_what_the_validator_rejects(job: dict[str, object]) -> None:
    validator = jsonschema.Draft202012Validator(manifest_schema())
    assert not validator.is_valid({"version": 1, "jobs": [job]})


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1280, 720), colour).save(buf, format="PNG")
    return buf.getvalue()


async def test_local_images_are_sent_as_checked_and_one_edited_meanwhile_is_not(
    sim: Simulator, tmp_path: Path
) -> None:
    shots = {name: _png((i, 2, 3)) for i, name in enumerate("abc")}
    for name, data in shots.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    jobs = "".join(f"  - {{id: {n}, prompt: shot {n}, image_url: {n}.png}}\n" for n in shots)
    path = tmp_path / "m.yaml"
    path.write_text(f"version: 1\ndefaults: {{model: {I2V}, duration: 4}}\njobs:\n{jobs}")
    m = load_manifest(path)
    (tmp_path / "b.png").write_bytes(_png((7, 7, 7)))  # edited after the manifest was checked
    out = tmp_path / "out"
    report = await run(m, fast_settings(out, sim.base_url))
    assert report.counts["done"] == 2 and [job for job, _ in report.failed] == ["b"]
    assert report.failed[0][1].kind == "submit_failed" and report.exit_code == 1
    assert "b.png changed since the manifest was checked" in report.failed[0][1].message
    sent = {g.body["prompt"]: g.body["image_url"] for g in sim.generations.values()}
    uri = "data:image/png;base64,{}".format
    assert sent == {f"shot {n}": uri(base64.b64encode(shots[n]).decode()) for n in "ac"}

    again = await run(load_manifest(path), fast_settings(out, sim.base_url))  # checked anew
    assert again.exit_code == 0 and again.counts["done"] == 3 and sim.stats.creates_ok == 3
    edited = [g.body["image_url"] for g in sim.generations.values() if g.body["prompt"] == "shot b"]
    assert edited == [uri(base64.b64encode(_png((7, 7, 7))).decode())]
