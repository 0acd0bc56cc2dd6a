"""The training scripts of train_scripts/, imported as modules by the tests."""
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / 'train_scripts'


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'timm_srn_{name}', SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
