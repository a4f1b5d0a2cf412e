"""curate: Ray-native curation of image training data into one LanceDB table."""

__version__ = "0.1.0"

from curate.config import Config, load_config  # noqa: E402
from curate.pipeline import Pipeline  # noqa: E402
from curate.run import RunSummary  # noqa: E402

__all__ = ["Config", "Pipeline", "RunSummary", "__version__", "load_config"]
