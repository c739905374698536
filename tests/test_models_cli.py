"""``forgeline models`` / ``promote`` / ``rollback`` and ``forgeline load <model>/production``, against
a local model store and a shm tier in a temporary folder: the listing shows production, previous,
rejected (with the reason) and incomplete versions; a refusal is one line and exit status 1; load
follows the alias from storage and from the tier, and a rejected version loads only by its id with
``--allow-rejected``."""

from __future__ import annotations

import io
import json

import pytest
import torch

from jobs import cli
from pipeline import export, promotion
from pipeline.shm_tier import ShmTier
from pipeline.storage import LocalStorage, join

GATE_FAIL = {"accuracy_gate": {"passed": False, "value": 3.1, "limit": 2.0}}
GATE_PASS = {"accuracy_gate": {"passed": True, "value": 0.4, "limit": 2.0}}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A model store with digits v1 (8 floats), v2 (16), v3 (32, rejected by its gate), v4 (64,
    a shard missing); v1 then v2 promoted."""
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("FORGELINE_SHM_ROOT", str(tmp_path / "shm"))
    store = LocalStorage(tmp_path / "store")
    for i, v in enumerate(["v1", "v2", "v3", "v4"]):
        export.export({"w": torch.full((8 << i,), float(i))}, store, "digits", v, run_id=f"run-{v}-0000")
    export.record_gates(store, "digits", "v2", GATE_PASS)
    export.record_gates(store, "digits", "v3", GATE_FAIL)
    manifest = export.read_manifest(store, "digits", "v4")
    store.delete(join(export.version_prefix("digits", "v4"), manifest["shards"][0]["file"]))
    promotion.promote(store, "digits", "v1")
    promotion.promote(store, "digits", "v2", reason="better")
    return store


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_models_lists_production_previous_rejected_incomplete(env, capsys):
    rc, out, _ = run(capsys, "models", "digits", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["production"]["version"] == "v2" and info["production"]["previous"] == "v1"
    rows = {r["version"]: r for r in info["versions"]}
    assert [r["version"] for r in info["versions"]] == ["v1", "v2", "v3", "v4"]  # by creation time
    assert rows["v1"]["status"] == ["previous"]
    assert rows["v2"]["status"] == ["production", "latest"] and rows["v2"]["gates"] == GATE_PASS
    assert rows["v3"]["status"] == ["rejected"] and "accuracy_gate" in rows["v3"]["rejected"]["reason"]
    assert rows["v3"]["gates"]["accuracy_gate"]["passed"] is False
    assert rows["v4"]["status"] == ["incomplete"] and "missing" in rows["v4"]["problem"]
    assert rows["v1"]["run_id"] == "run-v1-0000" and rows["v1"]["created"] and rows["v2"]["promoted_at"]

    rc, out, _ = run(capsys, "models", "digits")
    assert rc == 0
    for text in ("production", "previous", "rejected: failed gate(s): accuracy_gate", "incomplete",
                 "accuracy_gate pass 0.4 (limit 2)", "run-v1-0", "production v2 since", "better"):
        assert text in out, text

    rc, out, _ = run(capsys, "models", "--json")  # every model
    assert rc == 0 and [m["model"] for m in json.loads(out)["models"]] == ["digits"]


def test_a_version_with_a_damaged_manifest_is_listed_as_incomplete_among_the_others(env, capsys):
    key = join(export.version_prefix("digits", "v3"), "manifest.json")
    env.write_atomic(key, b'{"version": "v3", "cre')
    rc, out, err = run(capsys, "models", "digits", "--json")
    assert rc == 0, err
    rows = {r["version"]: r for r in json.loads(out)["versions"]}
    assert sorted(rows) == ["v1", "v2", "v3", "v4"] and rows["v2"]["status"] == ["production", "latest"]
    assert rows["v3"]["status"] == ["incomplete"] and env.uri(key) in rows["v3"]["problem"]
    assert "corrupt or truncated" in rows["v3"]["problem"]


def test_models_of_an_unknown_model_is_one_line(env, capsys):
    rc, _, err = run(capsys, "models", "nosuch")
    assert rc == 1 and "no published version of 'nosuch'" in one_line(err)
    rc, _, err = run(capsys, "models", "../x")
    assert rc == 1 and one_line(err)
    rc, out, err = run(capsys, "models", "")  # not "every model"
    assert rc == 1 and not out and "invalid model name ''" in one_line(err)


def test_an_empty_store_is_an_empty_json_list_and_a_lost_production_folder_is_shown(env, tmp_path, capsys,
                                                                                       monkeypatch):
    for o in env.list(export.version_prefix("digits", "v2")):  # production's own folder, gone
        env.delete(o.key)
    rc, out, err = run(capsys, "models", "digits", "--json")
    assert rc == 0, err
    rows = {r["version"]: r for r in json.loads(out)["versions"]}
    assert rows["v2"]["status"] == ["production", "incomplete"] and "no such published version" in rows["v2"]["problem"]
    from jobs.models_cli import model_versions, versions_table
    from rich.console import Console

    wide = Console(width=400, record=True, file=io.StringIO())
    wide.print(versions_table(model_versions(env, "digits")))
    text = wide.export_text()
    assert "incomplete: " in text and "no such published version 'v2'" in text, text

    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "empty"))
    assert run(capsys, "models", "--json")[:2] == (0, '{"models": []}\n')
    rc, _, err = run(capsys, "models")
    assert rc == 1 and "no published model in" in one_line(err)


def test_promote_refuses_rejected_incomplete_and_unknown_versions(env, capsys):
    for version, why in [("v3", "rejected: failed gate(s): accuracy_gate"), ("v4", "missing"),
                         ("v9", "no such published version"), ("production", "is a reference"),
                         ("../../x", "invalid version '../../x'")]:
        rc, out, err = run(capsys, "promote", "digits", version)
        assert rc == 1 and not out and why in one_line(err) and err.startswith("forgeline: cannot promote"), err
    assert promotion.production(env, "digits")["version"] == "v2"  # unchanged

    rc, out, err = run(capsys, "promote", "digits", "v1", "--reason", "hotfix")
    assert rc == 0 and "promoted digits/v1 to production (previous: v2)" in out
    rec = promotion.production(env, "digits")
    assert rec["version"] == "v1" and rec["reason"] == "hotfix" and rec["previous"] == "v2"


def test_rollback(env, capsys):
    rc, out, _ = run(capsys, "rollback", "digits")
    assert rc == 0 and "production is v1 again (was v2)" in out
    assert promotion.production(env, "digits")["version"] == "v1"
    rc, out, _ = run(capsys, "rollback", "digits")  # the rollback's previous is v2: back again
    assert rc == 0 and promotion.production(env, "digits")["version"] == "v2"
    rc, _, err = run(capsys, "rollback", "other")
    assert rc == 1 and "nothing is in production" in one_line(err)
    assert [r["version"] for r in promotion.history(env, "digits")] == ["v1", "v2", "v1", "v2"]


def test_the_gates_a_promotion_recorded_stay_listed_after_a_rollback(env, capsys):
    """The pipeline's promotion records gates its manifest does not hold (the quantized variants'):
    a later rollback to that version records none, and `models` still shows what it passed."""
    int4 = {"accuracy_gate.int4": {"passed": True, "value": 1.2, "limit": 2.0}}
    promotion.promote(env, "digits", "v1", gates=int4)
    promotion.promote(env, "digits", "v2")
    assert run(capsys, "rollback", "digits")[0] == 0  # v1 again, by a record without gates
    rc, out, _ = run(capsys, "models", "digits", "--json")
    assert rc == 0
    assert {r["version"]: r for r in json.loads(out)["versions"]}["v1"]["gates"] == int4


def test_load_production_from_storage_and_from_the_shm_tier(env, tmp_path, capsys):
    def load(*argv: str) -> dict:
        rc, out, err = run(capsys, "load", *argv, "--json")
        assert rc == 0, err
        return json.loads(out.strip().splitlines()[-1])

    got = load("digits/production")
    assert got["from"] == "remote" and got["bytes"] == 16 * 4  # v2
    tier = ShmTier(tmp_path / "shm")
    tier.prewarm(env, "digits", "v1")  # the tier holds only the previous version: not production
    assert load("digits/production")["from"] == "remote"
    tier.prewarm(env, "digits", "production")
    got = load("digits/production")
    assert got["from"] == "shm" and got["bytes"] == 16 * 4
    promotion.rollback(env, "digits")
    got = load("digits/production")  # the alias moved to v1, which the tier holds
    assert got["from"] == "shm" and got["bytes"] == 8 * 4
    assert load("digits/production", "--no-shm")["from"] == "remote"
    assert load("digits/latest")["bytes"] == 16 * 4  # v3 is newer but rejected, v4 incomplete


def test_load_quantized_variant_production(env, capsys):
    export.export({"w": torch.ones(4, dtype=torch.int8)}, env, "digits-int8", "q1")
    promotion.promote(env, "digits-int8", "q1")
    rc, out, err = run(capsys, "load", "digits-int8/production", "--json")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["bytes"] == 4


def test_load_refuses_rejected_versions_unless_allowed(env, tmp_path, capsys):
    rc, _, err = run(capsys, "load", "digits/v3")
    assert rc == 1 and "rejected" in one_line(err) and "--allow-rejected" in err
    rc, out, err = run(capsys, "load", "digits/v3", "--allow-rejected", "--json")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["bytes"] == 32 * 4
    # a copy in the tier made before the rejection is refused too: rejection is the store's
    export.record_gates(env, "digits", "v1", GATE_PASS)
    ShmTier(tmp_path / "shm").prewarm(env, "digits", "v1")
    export.record_gates(env, "digits", "v1", GATE_FAIL)
    rc, _, err = run(capsys, "load", "digits/v1")
    assert rc == 1 and "rejected" in one_line(err)
    rc, _, err = run(capsys, "load", "digits/v4")
    assert rc == 1 and "missing" in one_line(err)
    rc, _, err = run(capsys, "load", "digits/production")  # production (v2) still loads
    assert rc == 0, err


@pytest.mark.parametrize("record,commands", [
    ("production", [["models", "digits"], ["load", "digits/production"], ["promote", "digits", "v1"],
                    ["rollback", "digits"]]),
    ("promotions", [["models", "digits"]]),  # (a rollback reads the alias only)
    ("v2/manifest.json", [["load", "digits/v2"], ["load", "digits/production"], ["promote", "digits", "v2"]]),
])
@pytest.mark.parametrize("damage", [b'{"version": "v2", "at', b"[]"], ids=["truncated", "not-an-object"])
def test_a_damaged_record_is_one_line_naming_it(env, capsys, record, commands, damage):
    """A promotion alias, promotion record or manifest damaged outside forgeline (every write it
    makes is atomic): each command that reads it fails with one line naming the file and what is
    wrong, and changes nothing."""
    prefix = join(export.DEFAULT_ROOT, "digits")
    key = env.list(join(prefix, record))[-1].key  # a promotion record: the newest
    env.write_atomic(key, damage)
    before = {o.key: env.read(o.key) for o in env.list(prefix)}
    for argv in commands:
        rc, _, err = run(capsys, *argv)
        assert rc == 1 and env.uri(key) in one_line(err), (argv, err)
        assert ("is corrupt or truncated" if damage.startswith(b"{") else "is a JSON list, not an object") in err
    assert {o.key: env.read(o.key) for o in env.list(prefix)} == before
