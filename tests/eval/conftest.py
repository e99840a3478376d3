from tests.world.conftest import SMALL_SIZES, small_world  # noqa: F401  (shared session fixture)
