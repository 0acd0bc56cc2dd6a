"""Overlay PNGs: size, content per label, and the command line."""
import numpy as np
import torch
import timm
from PIL import Image

from timm_srn.losses import HeatmapBuffer
from timm_srn.viz import TILE, TITLE, main, overlay, save_buffer_overlays, save_model_overlays


def _image():
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 255, (120, 140, 3), dtype=np.uint8))


def test_srn_grid_size_and_labels(tmp_path):
    model = timm.create_model('srn_test_resnet', num_classes=6)
    path = save_model_overlays(model, _image(), tmp_path / 'srn.png', label_names=list('abcdef'), labels=[0, 3])
    img = Image.open(path)
    assert img.size == (4 * TILE, 2 * (TILE + TITLE))  # input, A, U, class map; two labels
    rows = np.asarray(img)
    row0, row1 = rows[TITLE:TITLE + TILE, TILE:], rows[2 * TITLE + TILE:, TILE:]
    assert np.abs(row0.astype(int) - row1).mean() > 1  # different labels' maps give different overlays


def test_plain_model_grid_and_overlay_differs_between_maps(tmp_path):
    model = timm.create_model('test_resnet', num_classes=5)
    path = save_model_overlays(model, _image(), tmp_path / 'plain.png', top_k=3)
    assert Image.open(path).size == (2 * TILE, 3 * (TILE + TITLE))
    a = np.asarray(overlay(_image(), torch.arange(16.).view(4, 4)))
    b = np.asarray(overlay(_image(), torch.arange(16.).view(4, 4).T))
    assert a.shape == (TILE, TILE, 3) and np.abs(a.astype(int) - b).mean() > 1


def test_buffer_grid(tmp_path):
    buffer = HeatmapBuffer(3, 4, (4, 4), dtype=torch.float32)
    buffer.write(torch.tensor([1]), torch.randn(1, 4, 4, 4), torch.tensor([[0., 0., 1., 1.]]), torch.tensor([False]), 0.9)
    path = save_buffer_overlays(buffer, 1, _image(), tmp_path / 'buffer.png', top_k=2)
    assert Image.open(path).size == (3 * TILE, TILE + TITLE)


def test_command_line(tmp_path, capsys):
    _image().save(tmp_path / 'in.jpg')
    main(['--model', 'srn_test_convnext', '--image', str(tmp_path / 'in.jpg'), '--out', str(tmp_path / 'out.png')])
    assert Image.open(tmp_path / 'out.png').size == (4 * TILE, 3 * (TILE + TITLE))
    assert 'wrote' in capsys.readouterr().out


def test_command_line_loads_the_weights_of_a_local_folder(tmp_path, monkeypatch):
    from timm.models._hub import save_for_hf
    import timm_srn.viz
    trained = timm.create_model('srn_test_resnet', num_classes=3)
    save_for_hf(trained, str(tmp_path / 'folder'))
    _image().save(tmp_path / 'in.jpg')
    used = []
    monkeypatch.setattr(timm_srn.viz, 'save_model_overlays', lambda model, *args: used.append(model) or args[1])
    main(['--model', f'local-dir:{tmp_path / "folder"}', '--image', str(tmp_path / 'in.jpg'), '--out', str(tmp_path / 'o.png')])
    for key, value in trained.state_dict().items():
        assert torch.equal(value, used[0].state_dict()[key]), key  # no --pretrained needed: the folder's weights
