"""Component tests reuse the project's session fixtures (a smoke source library, recipes, features,
trained models)."""

from tests.conftest import mixer, smoke_features, smoke_library, smoke_models, smoke_recipes  # noqa: F401
