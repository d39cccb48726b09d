"""`python -m zspa_jax generate` in-process (`main([...])`): several images, videos (a file
written with PyAV, and a folder of frames), the budget and the method options, each
answer equal to `zspa_jax.generate` called with the same inputs; bad input is one
`error:` line and exit status 2."""

from __future__ import annotations

import numpy as np
import pytest

import zspa_jax
from tests.support.tiny_qwen2_5_vl import converted, random_clip, tiny_model
from zspa_jax.__main__ import main
from zspa_jax.demo import scenes
from zspa_jax.demo.run import demo_model_path

DEMO = demo_model_path()
NEW = 3  # new tokens per answer


@pytest.fixture(scope="module")
def demo():
    return zspa_jax.load(DEMO)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two scene images as PNG files (lossless: the CLI reads back exactly these pixels)."""
    root = tmp_path_factory.mktemp("images")
    out = []
    for i in range(2):
        image = scenes.example("test", i).image().convert("RGB")
        path = root / f"scene{i}.png"
        image.save(path)
        out.append((str(path), image))
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_method_option_from_the_schema(capsys):
    from zspa_jax.methods import METHODS

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for method in METHODS.values():
        for option in method.options:
            assert option.flag in text and option.help in text, option.name
    assert "--option NAME=VALUE" in text and "python -m convert.<family>" in text
    assert "convert.llava`" not in text  # the model text names no one family


def test_several_images_budget_and_options_answer_as_generate(capsys, demo, images):
    question = scenes.chat_prompt(scenes.example("test", 0).qa.question)
    question = question.replace("<image>", "<image><image>")  # the two images, in order
    paths = [a for path, _ in images for a in ("--image", path)]
    code, out, err = run(
        capsys,
        "--model",
        str(DEMO),
        *paths,
        "--prompt",
        question,
        "--keep",
        "16",
        "--budget",
        "image",
        "--core-ratio",
        "0.25",
        "--max-new-tokens",
        str(NEW),
    )
    assert code == 0, err
    prune = zspa_jax.PruneConfig(keep=16, budget="image", core_ratio=0.25)
    want = zspa_jax.generate(
        demo, [question], [[img for _, img in images]], prune=prune, max_new_tokens=NEW
    )
    assert out.splitlines() == [want.texts[0]]
    assert "[visual tokens 32/1152 |" in err  # 16 of each image's 576


def test_option_flag_and_option_pairs_are_the_same_config(capsys, demo, images):
    question = scenes.chat_prompt(scenes.example("test", 1).qa.question)
    common = ("--model", str(DEMO), "--image", images[1][0], "--prompt", question)
    common += ("--keep", "8", "--method", "dart", "--max-new-tokens", str(NEW))
    code, by_flags, err = run(capsys, *common, "--layer", "1", "--image-pivots", "2")
    assert code == 0, err
    code, by_pairs, err = run(capsys, *common, "--option", "layer=1", "--option", "image_pivots=2")
    assert code == 0, err
    prune = zspa_jax.PruneConfig(keep=8, method="dart", options={"layer": 1, "image_pivots": 2})
    want = zspa_jax.generate(demo, [question], [images[1][1]], prune=prune, max_new_tokens=NEW)
    assert by_flags == by_pairs == want.texts[0] + "\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--keep", "8", "--layer", "1"), "method 'zspaprune' has no option 'layer'"),
        (("--keep", "8", "--method", "dart"), "method 'dart': layer K=2 is outside the decoder"),
        (
            ("--keep", "8", "--method", "dart", "--image-pivots", "-1"),
            "option image_pivots must be an integer >= 0",
        ),
        (
            (
                "--core-ratio",
                "0.5",
            ),
            "--core-ratio configure pruning, which needs --keep or --ratio",
        ),
        (("--keep", "8", "--option", "layer"), "--option takes NAME=VALUE"),
        (("--keep", "8", "--option", "core_ratio=0.1", "--core-ratio", "0.2"), "given twice"),
        (("--image", "missing.png"), "--image 'missing.png' does not exist"),
        (("--video", "missing.mp4"), "--video 'missing.mp4' does not exist"),
    ],
)
def test_bad_input_is_one_error_line(capsys, images, argv, message):
    base = ("--model", str(DEMO), "--prompt", "what is this")
    if "--image" not in argv:
        base += ("--image", images[0][0])
    code, out, err = run(capsys, *base, *argv)
    assert code == 2 and not out
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_video_on_a_model_without_video_is_refused(capsys, images, tmp_path):
    for i, frame in enumerate(random_clip(2, 24, 32, seed=0)):
        from PIL import Image

        Image.fromarray(frame).save(tmp_path / f"{i:03d}.png")
    code, _, err = run(capsys, "--model", str(DEMO), "--prompt", "what", "--video", str(tmp_path))
    assert code == 2 and "video input is not supported by LLaVA" in err, err


# --------------------------------------------------------------------------- video (Qwen2.5-VL)


def write_video(path, frames: np.ndarray, fps: int) -> None:
    """frames uint8 [T, H, W, 3] -> a lossless (PNG-coded) QuickTime file, with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def qwen():
    tiny = tiny_model()
    return tiny, converted(tiny)


def test_video_file_and_frame_folder_answer_as_generate(capsys, qwen, tmp_path):
    from PIL import Image

    _, path = qwen
    frames = random_clip(4, 24, 32, seed=5)
    write_video(tmp_path / "clip.mov", frames, fps=2)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    prune_args = ("--keep", "4", "--method", "fastv", "--option", "layer=1")
    common = ("--model", str(path), "--prompt", "what happens", "--max-new-tokens", str(NEW))
    code, from_file, err = run(capsys, *common, "--video", str(tmp_path / "clip.mov"), *prune_args)
    assert code == 0, err
    assert "[visual tokens 4/24 |" in err  # 2 temporal patches of 3 x 4 merged tokens
    code, from_folder, err = run(capsys, *common, "--video", str(folder), "--fps", "2", *prune_args)
    assert code == 0, err
    vlm = zspa_jax.load(path)
    want = zspa_jax.generate(
        vlm,
        ["what happens"],
        videos=[[zspa_jax.Video(frames, fps=2.0)]],
        prune=zspa_jax.PruneConfig(keep=4, method="fastv", layer=1),
        max_new_tokens=NEW,
    )
    assert from_file == from_folder == want.texts[0] + "\n"
    code, unpruned, err = run(capsys, *common, "--video", str(folder), "--fps", "2")
    assert code == 0 and "[visual tokens 24/24 |" in err, err
    plain = zspa_jax.generate(
        vlm, ["what happens"], videos=[[zspa_jax.Video(frames, fps=2.0)]], max_new_tokens=NEW
    )
    assert unpruned == plain.texts[0] + "\n"


def test_bad_video_files_are_refused_by_name(capsys, qwen, tmp_path):
    _, path = qwen
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    common = ("--model", str(path), "--prompt", "what")
    code, _, err = run(capsys, *common, "--video", str(broken))
    assert code == 2 and f"--video {str(broken)!r} is not a readable video" in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, *common, "--video", str(empty))
    assert code == 2 and "is an empty folder" in err, err
    write_video(tmp_path / "clip.mov", random_clip(4, 24, 32, seed=6), fps=2)
    code, _, err = run(capsys, *common, "--video", str(tmp_path / "clip.mov"), "--fps", "0")
    assert code == 2 and "Video.fps must be a positive number" in err, err
