import atexit
import os
import shutil
import tempfile

from jobs.packaged import lorafleet_cache

# No test reads or writes the user's HOME (an embedded Ray writes ~/.ray/auth_token there): every
# run gets an empty one, as a new user has. Only the model cache `make model` filled is kept.
os.environ.setdefault("LORAFLEET_CACHE", str(lorafleet_cache()))
os.environ["HOME"] = tempfile.mkdtemp(prefix="lorafleet-test-home-")
atexit.register(shutil.rmtree, os.environ["HOME"], True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402

SQUAD_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad-v1.1-subset" / "train-notre-dame.json"


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory) -> str:
    return str(tiny_models.build("causal", tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_causal_vllm(tmp_path_factory) -> str:
    """The tiny Llama with attention heads of 32 (vLLM's CPU attention has no head size 16)."""
    return str(tiny_models.build("causal", tmp_path_factory.mktemp("tiny-llama-32"), head_dim=32))


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> str:
    return str(tiny_models.build("seq2seq", tmp_path_factory.mktemp("tiny-t5")))


@pytest.fixture
def squad_file() -> Path:
    if not SQUAD_FILE.exists():
        pytest.skip(f"SQuAD subset not found at {SQUAD_FILE}")
    return SQUAD_FILE


BUCKET = "lorafleet-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 endpoint (moto) that pyarrow, Ray and Serve replicas reach through AWS_ENDPOINT_URL."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "LORAFLEET_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
