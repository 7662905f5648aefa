from __future__ import annotations

import numpy as np
import pytest

from remote_vector_index_builder.core import dataset
from remote_vector_index_builder.core.errors import DatasetError
from remote_vector_index_builder.core.params import BuildRequest
from test_remote_vector_index_builder.support import required_body
from testbed.data import clustered, doc_id_blob, to_binary, vector_blob


def request(**kw: object) -> BuildRequest:
    return BuildRequest.model_validate(required_body("b", "v", 16, 50, **kw))


def as_buffer(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=np.uint8)


def test_float_parse_is_a_view_of_the_buffer() -> None:
    vectors = clustered(50, 16)
    ids = np.arange(50, dtype=np.int32) * 7
    vbuf, ibuf = as_buffer(vector_blob(vectors)), as_buffer(doc_id_blob(ids))
    parsed = dataset.parse(request(), vbuf, ibuf)
    assert np.shares_memory(parsed.vectors, vbuf)
    assert np.shares_memory(parsed.doc_ids, ibuf)
    np.testing.assert_array_equal(parsed.vectors, vectors)
    np.testing.assert_array_equal(parsed.doc_ids, ids)


def test_byte_and_binary_layouts() -> None:
    vectors = clustered(50, 16)
    int8 = np.clip(vectors * 20, -128, 127).astype(np.int8)
    parsed = dataset.parse(
        request(data_type="byte"), as_buffer(int8.tobytes()), as_buffer(doc_id_blob(np.arange(50)))
    )
    assert parsed.vectors.dtype == np.int8 and parsed.vectors.shape == (50, 16)
    bits = to_binary(vectors)
    parsed = dataset.parse(
        request(data_type="binary", index_parameters={"space_type": "hamming"}),
        as_buffer(bits.tobytes()),
        as_buffer(doc_id_blob(np.arange(50))),
    )
    assert parsed.vectors.dtype == np.uint8 and parsed.vectors.shape == (50, 2)
    np.testing.assert_array_equal(parsed.vectors, bits)


def test_wrong_sizes_say_what_was_expected() -> None:
    vectors = clustered(49, 16)
    with pytest.raises(DatasetError) as info:
        dataset.parse(
            request(), as_buffer(vector_blob(vectors)), as_buffer(doc_id_blob(np.arange(50)))
        )
    message = str(info.value)
    assert "holds 3136 bytes, expected 3200" in message
    assert "doc_count 50 x dimension 16 x 4 bytes" in message
    with pytest.raises(DatasetError, match=r"doc id object 'v\.knndid' holds 198 bytes"):
        dataset.parse(
            request(),
            as_buffer(vector_blob(clustered(50, 16))),
            as_buffer(doc_id_blob(np.arange(50))[:-2]),
        )


def test_non_finite_and_fp16_overflow_are_rejected() -> None:
    vectors = clustered(50, 16)
    vectors[7, 3] = np.nan
    parsed = dataset.parse(
        request(), as_buffer(vector_blob(vectors)), as_buffer(doc_id_blob(np.arange(50)))
    )
    with pytest.raises(DatasetError, match=r"row 7 .* NaN or infinity"):
        dataset.check_values(parsed, rows=4)
    vectors = clustered(50, 16)
    vectors[30, 0] = 70000.0
    parsed = dataset.parse(
        request(data_type="half_float"),
        as_buffer(vector_blob(vectors)),
        as_buffer(doc_id_blob(np.arange(50))),
    )
    with pytest.raises(DatasetError, match=r"row 30 .* fp16 range"):
        dataset.check_values(parsed, rows=8)
    dataset.check_values(
        dataset.parse(
            request(), as_buffer(vector_blob(vectors)), as_buffer(doc_id_blob(np.arange(50)))
        )
    )


def test_to_fp16_matches_numpy_cast() -> None:
    vectors = clustered(100, 8)
    np.testing.assert_array_equal(dataset.to_fp16(vectors, rows=7), vectors.astype(np.float16))


def test_release_returns_whole_pages_of_consumed_rows_only() -> None:
    from remote_vector_index_builder.core.object_store import _page_buffer

    dim = 777  # rows straddle page boundaries
    vectors = clustered(3000, dim)
    buffer = _page_buffer(vectors.nbytes)
    buffer[:] = np.frombuffer(vector_blob(vectors), dtype=np.uint8)
    ids = as_buffer(doc_id_blob(np.arange(3000)))
    parsed = dataset.parse(request(dimension=dim, doc_count=3000), buffer, ids)
    parsed.release(1000, 2000)
    # Rows 1000..1999 lie in released pages except where they share a page with kept rows.
    np.testing.assert_array_equal(parsed.vectors[:1000], vectors[:1000])
    np.testing.assert_array_equal(parsed.vectors[2000:], vectors[2000:])
    assert not parsed.vectors[1002:1998].any()
    # Buffers that are not an anonymous mapping are left alone.
    plain = dataset.parse(request(), as_buffer(vector_blob(clustered(50, 16))), ids[:200])
    before = plain.vectors.copy()
    plain.release(0, 50)
    np.testing.assert_array_equal(plain.vectors, before)


def test_half_float_arrives_as_fp32_or_fp16_told_apart_by_size() -> None:
    vectors = clustered(50, 16)
    ids = as_buffer(doc_id_blob(np.arange(50)))
    half = request(data_type="half_float")
    as_fp32 = dataset.parse(half, as_buffer(vector_blob(vectors)), ids)
    assert as_fp32.vectors.dtype == np.float32
    fp16 = vectors.astype("<f2")
    as_fp16 = dataset.parse(half, as_buffer(fp16.tobytes()), ids)
    assert as_fp16.vectors.dtype == np.float16 and as_fp16.vectors.shape == (50, 16)
    np.testing.assert_array_equal(as_fp16.vectors, fp16)
    # Any other size names both widths it could have been.
    with pytest.raises(DatasetError) as info:
        dataset.parse(half, as_buffer(b"\0" * (50 * 16 * 3)), ids)
    message = str(info.value)
    assert "holds 2400 bytes, expected 3200" in message
    assert "(doc_count 50 x dimension 16 x 4 bytes, fp32) or 1600" in message
    assert "x 2 bytes, fp16" in message
    # Only half_float has a second width: 2 bytes a value is a wrong size for float.
    with pytest.raises(DatasetError, match="holds 1600 bytes, expected 3200"):
        dataset.parse(request(), as_buffer(fp16.tobytes()), ids)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0, 1, 2, -4, 9], r"negative doc id \(-4\) at row 3"),
        ([0, 1, 5, 5, 9], "not strictly increasing: row 3 holds 5 after 5"),
        ([0, 1, 5, 4, 9], "not strictly increasing: row 3 holds 4 after 5"),
    ],
)
def test_doc_ids_must_be_non_negative_and_strictly_increasing(ids: list[int], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        dataset.check_doc_ids(np.array(ids, dtype="<i4"), "k.knndid")


def test_doc_ids_are_checked_across_batch_boundaries() -> None:
    ids = np.arange(10, dtype="<i4")
    for rows in (1, 2, 3, 10, 11):
        dataset.check_doc_ids(ids, "k.knndid", rows=rows)
    ids[4] = ids[3]  # the step from the last id of one 2-row batch to the next
    for rows in (1, 2, 3, 4):
        with pytest.raises(DatasetError, match="row 4 holds 3 after 3"):
            dataset.check_doc_ids(ids, "k.knndid", rows=rows)
