"""dvc.yaml: every stage lists every param it reads, so DVC reruns it when one changes (a profile included)."""

from __future__ import annotations

import yaml

from flywheel.stages import declared_sections, stage_names

# the params.yaml sections each stage reads: those its step's stage() takes (pipelines/<name>.py), so a new stage
# is checked without being named here; dvc.yaml may list the whole section or the keys of it the stage reads
READS = {name: declared_sections(name) for name in stage_names()}


def _covers(listed: list[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in listed)


def _profile_touches(profiles: dict, key: str) -> bool:
    for over in profiles.values():
        node = over or {}
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


def test_every_stage_lists_every_param_it_reads_and_the_profile_where_one_changes_them(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    profiles = yaml.safe_load((repo_root / "params.yaml").read_text())["profiles"]
    assert set(stages) == set(READS), "every dvc.yaml stage is a step file pipelines/<name>.py with a stage()"
    for stage, keys in READS.items():
        listed = [str(p) for p in stages[stage].get("params", [])]
        for key in keys:
            assert any(_covers(listed, key) or p.startswith(key + ".") for p in listed), (
                f"dvc.yaml {stage}: reads {key} but does not list it"
            )
            if _profile_touches(profiles, key):
                # FLYWHEEL_PROFILE aside, a profile edit in params.yaml must rerun the stage
                assert {"profile", "profiles"} <= set(listed), f"dvc.yaml {stage}: a profile changes {key}"
    # the gate is never a profile's to change, so bless does not depend on profiles
    assert not _profile_touches(profiles, "bless") and "profiles" not in stages["bless"].get("params", [])
