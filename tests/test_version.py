"""An older timm found first on the path (a timm source tree, e.g. timm's train.py run inside an older clone) is
refused at import with an error that names it."""
import subprocess
import sys


def test_an_older_timm_on_the_path_is_refused_by_name(tmp_path):
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / '__init__.py').write_text('__version__ = "1.0.29.dev0"\n')
    result = subprocess.run([sys.executable, '-c', 'import timm_srn'], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith('ImportError: timm-srn needs timm>=') and '1.0.29.dev0' in message
    assert str(tmp_path / 'timm') in message and 'python -P train.py' in message
