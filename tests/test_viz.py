"""Overlay PNGs: size, content per label, and the command line."""
import numpy as np
import torch
import timm
from PIL import Image

from timm_srn.hub import export_for_hub
from timm_srn.losses import HeatmapBuffer
import pytest

from timm_srn.viz import TILE, colourise, main, overlay, save_buffer_overlays, save_model_overlays


def _image():
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 255, (120, 140, 3), dtype=np.uint8))


def _colour_bar_present(path):
    """The colour bar: a column running from the brightest to the darkest inferno colour."""
    pixels = np.asarray(Image.open(path).convert('RGB'))
    top, bottom = colourise(np.array([[1.]]))[0, 0], colourise(np.array([[0.]]))[0, 0]
    return any((pixels[:, x] == top).all(-1).any() and (pixels[:, x] == bottom).all(-1).any()
               for x in range(pixels.shape[1] - 80, pixels.shape[1]))


def test_srn_rows_show_labels_maps_colour_bar_and_legend(tmp_path):
    model = timm.create_model('srn_test_resnet', num_classes=6)
    path = save_model_overlays(model, _image(), tmp_path / 'srn.png', label_names=list('abcdef'), labels=[0, 3],
                               true_labels=[3])
    img = Image.open(path)
    width, height = img.size
    assert width > 4 * TILE and 2 * TILE < height < 3 * TILE + 300  # label, A, U, class map; two rows + text
    assert _colour_bar_present(path)
    rows = np.asarray(img.convert('RGB')).astype(int)
    # the two rows hold different maps: compare the attention tiles of both rows
    first = rows[:, TILE + 16:2 * TILE].reshape(-1, 3)
    assert len(np.unique(first, axis=0)) > 100


def test_plain_model_and_overlay_differs_between_maps(tmp_path):
    model = timm.create_model('test_resnet', num_classes=5)
    path = save_model_overlays(model, _image(), tmp_path / 'plain.png', top_k=3)
    width, height = Image.open(path).size
    assert 2 * TILE < width < 3 * TILE + 100 and height > 3 * TILE
    a = np.asarray(overlay(_image(), torch.arange(16.).view(4, 4)))
    b = np.asarray(overlay(_image(), torch.arange(16.).view(4, 4).T))
    assert a.shape == (TILE, TILE, 3) and np.abs(a.astype(int) - b).mean() > 1


def test_absent_labels_stay_dark_and_every_true_label_gets_a_row(tmp_path):
    from timm_srn.viz import FIXED_RANGES, _choose, _map_column
    absent = torch.linspace(-7, -0.2, 16).view(4, 4).sigmoid()  # class map of a label the model rules out
    present = torch.linspace(2, 6, 16).view(4, 4).sigmoid()
    dark, bright = (np.asarray(t.image).mean() for t in _map_column(_image(), [absent, present], FIXED_RANGES['class map']))
    assert bright > dark + 40
    own = np.asarray(overlay(_image(), absent)).mean()  # its own min-max would make it look as hot as a present one
    assert own > dark + 10
    probs = torch.tensor([.9, .8, .7, .1, .05, .02, .01, .6])
    assert _choose(probs, None, 3, true_labels=[3, 4, 5, 6, 2]) == [3, 4, 5, 6, 2, 0, 1]
    model = timm.create_model('test_resnet', num_classes=8)
    height = Image.open(save_model_overlays(model, _image(), tmp_path / 'all.png', true_labels=[0, 1, 2, 3, 4, 5, 6],
                                            top_k=3)).size[1]
    assert height > 7 * TILE


def test_single_positive_run_writes_the_stored_heatmaps(synthetic_dir, tmp_path, train_script):
    train_script.main(['--data-dir', str(synthetic_dir), '--output', str(tmp_path), '--model', 'test_resnet',
                       '--img-size', '64', '--batch-size', '16', '--workers', '0', '--no-progress', '--epochs', '1',
                       '--max-train-images', '48', '--max-val-images', '16', '--num-viz', '1', '--loss', 'spatial',
                       '--loss-kwargs', 'warmup_epochs=0'])
    assert Image.open(tmp_path / 'viz_train_heatmaps_0.png').size[0] > 2 * TILE
    assert (tmp_path / 'viz_val_0.png').exists()


def test_overlay_uses_the_full_colour_map():
    tile = np.asarray(overlay(_image(), torch.arange(16.).view(4, 4)))
    # dark end and bright end of inferno both present, blended over a dimmed grey image
    assert tile.min() < 40 and tile[..., 1].max() > 150


def test_buffer_grid(tmp_path):
    buffer = HeatmapBuffer(3, 4, (4, 4), dtype=torch.float32)
    buffer.write(torch.tensor([1]), torch.randn(1, 4, 4, 4), torch.tensor([[0., 0., 1., 1.]]), torch.tensor([False]), 0.9)
    path = save_buffer_overlays(buffer, 1, _image(), tmp_path / 'buffer.png', top_k=2)
    width, height = Image.open(path).size
    assert 3 * TILE < width < 4 * TILE + 100 and TILE < height < 2 * TILE
    assert _colour_bar_present(path)


def test_command_line_labels_by_name_or_index(tmp_path, capsys):
    _image().save(tmp_path / 'in.jpg')
    main(['--model', 'srn_test_convnext', '--image', str(tmp_path / 'in.jpg'), '--out', str(tmp_path / 'out.png')])
    assert 'wrote' in capsys.readouterr().out
    model = timm.create_model('srn_test_resnet', num_classes=3)
    model.pretrained_cfg['label_names'] = ['cat', 'dog', 'kite']
    export_for_hub(model, tmp_path / 'folder', 'ORG/NAME')  # label names travel in config.json
    source = f'local-dir:{tmp_path / "folder"}'
    main(['--model', source, '--image', str(tmp_path / 'in.jpg'), '--out', str(tmp_path / 'named.png'),
          '--labels', 'kite', '0', '--true-labels', 'dog'])
    assert Image.open(tmp_path / 'named.png').size[1] < Image.open(tmp_path / 'out.png').size[1]  # 2 rows, not 3
    with pytest.raises(SystemExit, match="unknown label 'zebra'; label names: cat, dog, kite"):
        main(['--model', source, '--image', str(tmp_path / 'in.jpg'), '--out', str(tmp_path / 'x.png'), '--labels', 'zebra'])


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
