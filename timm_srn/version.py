from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

__version__ = "0.1.0"


def check_timm() -> None:
    """Raise ImportError naming the timm that Python found when it is older than this package requires (pyproject's
    requirement, read from the installed metadata). A timm source tree on sys.path shadows the installed timm, e.g.
    timm's train.py run inside an older clone of its repository."""
    import timm
    try:
        requirements = [Requirement(r) for r in metadata.requires('timm-srn') or ()]
    except metadata.PackageNotFoundError:  # run from a source tree without installing: nothing to read
        return
    required = next((r for r in requirements if r.name == 'timm'), None)
    if required is not None and not required.specifier.contains(timm.__version__, prereleases=True):
        raise ImportError(
            f'timm-srn needs {required}, but Python imported timm {timm.__version__} from '
            f'{Path(timm.__file__).parent}. A timm source tree on the path shadows the installed timm: run timm\'s '
            'train.py from a clone at least that new, or with `python -P train.py` (Python >= 3.11) so the installed '
            'timm is imported.')
