"""The docs the code must match: every module has a row in the developer guide's table,
and every document the code cites exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from remote_vector_index_builder.app.settings import Settings
from remote_vector_index_builder.core import memory, sizing
from remote_vector_index_builder.core.data_types import DataType
from remote_vector_index_builder.core.multipart import UploadPlan

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "remote_vector_index_builder"


def table_modules() -> set[str]:
    """Module paths named in the first column of DEVELOPER_GUIDE.md's module table."""
    names: set[str] = set()
    for line in (ROOT / "DEVELOPER_GUIDE.md").read_text().splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([\w/]+\.py)`", line.split("|")[1]))
    return names


def test_every_module_of_the_package_is_in_the_developer_guide() -> None:
    modules = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }
    assert sorted(modules - table_modules()) == []
    assert sorted(table_modules() - modules) == [], "rows for modules that do not exist"


def test_the_documents_the_code_cites_exist() -> None:
    cited: set[str] = set()
    for folder in ("remote_vector_index_builder", "test_remote_vector_index_builder", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            cited.update(re.findall(r"\b((?:[\w-]+/)*[\w-]+\.md)\b", path.read_text()))
    assert "docs/knn-contract.md" in cited
    missing = [name for name in sorted(cited) if not (ROOT / name).exists()]
    assert missing == []


def doc_section(title: str, document: str = "README.md") -> str:
    text = (ROOT / document).read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_says_what_differs_from_the_reference_builder() -> None:
    section = doc_section("Coming from the reference builder")
    assert "opensearch-project/remote-vector-index-builder" in section
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    assert {
        "CPU_MEMORY_LIMIT",
        "GPU_MEMORY_LIMIT",
        "REQUEST_STORE_TTL_SECONDS",
        "REQUEST_STORE_TYPE",
    } <= named
    settings = {str(f.validation_alias) for f in Settings.model_fields.values()}
    # Every shared name is a setting here, except the one this service does not read.
    assert named - settings == {"REQUEST_STORE_TYPE"}
    ttl = Settings.model_fields["request_store_ttl_seconds"].default
    assert f"| {ttl}: a finished job outlives" in section


def test_readme_has_the_opensearch_version_matrix() -> None:
    section = doc_section("OpenSearch versions")
    releases = re.findall(r"^\| (3\.\d+)", section, re.MULTILINE)
    assert releases == ["3.0", "3.1", "3.2", "3.7", "3.9"]
    for name in (
        "knn.feature.remote_index_build.enabled",
        "knn.remote_index_build.vector_repo",
        "knn.remote_index_build.client.endpoint",
        "index.knn.remote_index_build.size_threshold",
        "k-NN #3459",
        "skip_stored_vectors",
        "unverified",
    ):
        assert name in section, name


def test_readme_walks_a_cluster_to_remote_builds() -> None:
    section = doc_section("Point your cluster at it")
    for step in (
        "opensearch-plugin install repository-s3",
        "PUT _snapshot/",
        "opensearch-keystore add",
        "_nodes/reload_secure_settings",
        '"knn.remote_index_build.repository"',
        '"knn.remote_index_build.service.endpoint"',
        '"knn.remote_index_build.size.max"',
        "index.knn.remote_index_build.size.min",
        "50mb",
        '"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"',
        "_plugins/_knn/stats",
    ):
        assert step in section, step
    policy = section.split("```json", 1)[1].split("```", 1)[0]
    assert json.loads(policy)["Statement"]


def test_readme_sizing_table_is_what_admission_admits() -> None:
    section = doc_section("Sizing")
    header, _, *rows = [line for line in section.splitlines() if line.startswith("| ")]
    dimensions = [int(d.split()[0]) for d in header.split("|")[2:-1]]
    settings = Settings(_env_file=None)  # the defaults: m 16, 16 MiB parts, CPU
    upload = UploadPlan.of(settings.s3_config())
    assert rows
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        limit = int(cells[0].split()[0]) * 2**30
        limits = sizing.Limits(limit, 0, memory.EstimateOptions(upload, settings.add_batch_rows))
        for dimension, cell in zip(dimensions, cells[1:], strict=True):
            segment = sizing.largest_segment(limits, DataType.FLOAT, dimension)
            assert cell == f"{segment.doc_count:,} / {segment.vector_bytes // 2**20}mb", cell


def test_readme_tells_the_load_balancer_idle_timeout_and_the_silent_fallbacks() -> None:
    text = (ROOT / "README.md").read_text()
    balancer = text.split("### Load balancer", 1)[1].split("\n### ", 1)[0]
    assert "RVIB_KEEP_ALIVE_SECONDS" in balancer and "idle timeout" in balancer
    fallbacks = text.split("### When builds quietly go back to the data node", 1)[1]
    for cause in ("`//_build`", "`CPU_MEMORY_LIMIT=32.0`", "no S3 credentials", "507"):
        assert cause in fallbacks.split("\n## ", 1)[0], cause


def test_the_contract_records_the_protocol_changes_and_their_clients() -> None:
    contract = (ROOT / "docs/knn-contract.md").read_text()
    blobs = contract.split("## 4.", 1)[1].split("\n## ", 1)[0]
    assert "fp16" in blobs and "by the object's size" in blobs
    assert "strictly increasing" in blobs and "non-negative" in blobs
    request = contract.split("## 1.", 1)[1].split("\n## ", 1)[0]
    for fact in ("3.7", "3.9", "k-NN #3459", "half_float", "m >= 2"):
        assert fact in request, fact


def test_api_md_names_every_field_and_parameter_of_the_jobs_listing() -> None:
    from remote_vector_index_builder.app.job_responses import JobSummary
    from remote_vector_index_builder.app.main import create_app

    section = doc_section("GET /_jobs", "API.md")
    named = set(re.findall(r"`([a-z_]+)`", section))
    assert sorted(set(JobSummary.model_fields) - named) == []
    schema = create_app(Settings(_env_file=None, device="cpu")).openapi()
    parameters = {p["name"] for p in schema["paths"]["/_jobs"]["get"]["parameters"]}
    assert parameters == {"state", "limit", "after"}
    rows = {row.split("|")[1].strip(" `") for row in section.splitlines() if row.startswith("| `")}
    assert rows == parameters
