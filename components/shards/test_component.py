import json

from kfp.dsl import Artifact, Dataset

from components.shards.component import write_shards
from flam_core.data.shards import iter_shards, shard_paths
from tests.conftest import smoke_params


def run_shards(tmp_path, smoke_library, smoke_recipes, *overrides: str) -> Dataset:
    (tmp_path / "params.json").write_text(smoke_params(*overrides).model_dump_json())
    shards = Dataset(uri=str(tmp_path / "shards"))
    write_shards.python_func(
        params=Artifact(uri=str(tmp_path / "params.json")),
        library=Dataset(uri=str(smoke_library[0])),
        recipes=Dataset(uri=str(smoke_recipes[0])),
        shards=shards,
    )
    return shards


def test_disabled_shards_write_only_a_summary_saying_so(smoke_library, smoke_recipes, tmp_path):
    shards = run_shards(tmp_path, smoke_library, smoke_recipes, "shards.enabled=false")
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["summary.json"]
    assert json.loads((tmp_path / "shards" / "summary.json").read_text()) == {"enabled": False, "splits": {}}
    assert shards.metadata == {"enabled": False}


def test_enabled_shards_hold_every_mixture_of_the_splits(smoke_library, smoke_recipes, tmp_path):
    shards = run_shards(
        tmp_path, smoke_library, smoke_recipes, "shards.enabled=true", "shards.splits=[val, test_unseen]"
    )
    summary = json.loads((tmp_path / "shards" / "summary.json").read_text())
    recipes = smoke_recipes[1]
    for split in ("val", "test_unseen"):
        stored = list(iter_shards(shard_paths(tmp_path / "shards", split)))
        assert len(stored) == summary["splits"][split]["n_mixtures"] == recipes.splits[split]["n_mixtures"]
    tars = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    assert tars == sorted(name for split in summary["splits"].values() for name in split["shards"])
    assert shards.metadata == {"enabled": True, "n_shards": len(tars)}
