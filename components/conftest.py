"""Component tests reuse the project's session fixtures (a smoke source library, recipes, features,
trained models)."""

from tests.conftest import (  # noqa: F401
    mixer,
    real_set,
    smoke_features,
    smoke_library,
    smoke_models,
    smoke_recipes,
    val_real_set,
)
