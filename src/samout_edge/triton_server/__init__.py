"""A Triton Inference Server model repository from an export (ONNX Runtime backend)
or an engine directory (TensorRT backend), so many clients share one GPU.

Triton keeps each sequence's cummax state itself (implicit state management), so a
client sends only ``input_ids`` with a sequence id and the start/end flags, and the
server batches the steps of different sequences together (the sequence batcher's
``oldest`` strategy runs a dynamic batcher over the candidate sequences). Written:

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx (+ external data)   or   REPO/NAME/1/model.plan
    REPO/NAME/initial_state/empty_max.<dtype>  the empty running max, raw little-endian
    REPO/NAME/samout-edge.json                 what we wrote (so a rerun replaces only that)

What the layout and the config rest on (Triton's docs and sources, read for this
module; nothing here ran on a real Triton server):

- Implicit state, ``initial_state { data_file }``:
  https://github.com/triton-inference-server/server/blob/main/docs/user_guide/implicit_state_management.md
  The data file lives in ``initial_state/`` under the *model* directory, not the
  version directory: core's SequenceBatchScheduler::GenerateInitialStateData reads
  ``JoinPath({model->LocalizedModelPath(), "initial_state", data_file})`` and
  LocalizedModelPath() is the model directory (the version path is that plus the
  version number); model_config.proto says the same, and Triton's own QA
  (qa/L0_sequence_batcher/test.sh) puts it at ``<model>/initial_state/``.
  https://github.com/triton-inference-server/core/blob/main/src/sequence_batch_scheduler/sequence_batch_scheduler.cc
  The file must hold at least prod(dims) * itemsize bytes (dims without the batch
  dim); a START request gets a fresh copy (the scheduler re-initialises the state
  when TRITONSERVER_REQUEST_FLAG_SEQUENCE_START is set), so the model needs no START
  input of its own.
- No control inputs: both backends count every control_input as a real model input
  (onnxruntime_backend's ModelInstanceState constructor adds one expected input per
  START/END/READY/CORRID control; tensorrt_backend binds each as an engine input),
  and our graphs have none. The initial state does the START control's job.
  https://github.com/triton-inference-server/onnxruntime_backend/blob/main/src/onnxruntime.cc
  https://github.com/triton-inference-server/tensorrt_backend/blob/main/src/instance_state.cc
- State inputs are not listed under ``input`` (the backends add the state count
  themselves), and state outputs are not listed under ``output`` (that is only for
  clients that want the state back: implicit_state_management.md).
- Pairing: core's SequenceStates::OutputState pairs the i-th output state with the
  i-th input state in name order (both are std::maps), so the sorted input names
  must pair with the sorted output names exactly as the graph does; checked here
  (``check_state_pairing``). past_max.{i}/present_max.{i} always pair.
  https://github.com/triton-inference-server/core/blob/main/src/sequence_state.cc
- Softmax KV caches are refused: a variable state dim starts at 1 on the first
  request (SequenceStates::Initialize turns every -1 into 1), and an initial_state
  must not contain variable dims, so a cache that starts empty (past_seq 0) cannot
  be expressed; the first step would attend to one garbage key. A fixed 0 would
  never grow. ``use_growable_memory`` changes where the buffer lives, not the
  shape the first request sees.
- Sequence batcher, ``oldest`` strategy, max_candidate_sequences,
  max_sequence_idle_microseconds (default 1 s, too short for a chat client):
  https://github.com/triton-inference-server/common/blob/main/protobuf/model_config.proto
  The dynamic batcher only batches requests whose inputs have the same shape, so
  one-token decode steps of many sequences batch together; prefills of different
  lengths run apart.
  https://github.com/triton-inference-server/server/blob/main/docs/user_guide/batcher.md
- ONNX Runtime backend session settings: it passes ``session.use_device_allocator_for_initializers``
  to ONNX Runtime as a session config entry and no other (src/onnxruntime.cc), so
  an export whose ``weights.ort_session_config`` needs another entry (the ``dq``
  int8/int4 format: session.disable_quant_qdq) is refused rather than served as a
  different function.
- TensorRT engines with several optimization profiles: the instance group must list
  them (``profile: ["0", "1"]``), else only profile 0 is used; Triton picks the
  profile per batch from the input shapes (model_config.proto, instance_group.profile).
  DLA engines run with ``secondary_devices { kind: KIND_NVDLA }``.
"""

from samout_edge.triton_server.pbtxt import config_pbtxt, parse_config
from samout_edge.triton_server.plan import (
    PackageResult,
    RepoPlan,
    TritonState,
    TritonTensor,
    check_model_name,
    check_state_pairing,
    default_model_name,
    initial_state_bytes,
    model_io,
    plan_repo,
    refuse_unsupported,
)
from samout_edge.triton_server.write import check_repository, package_triton, previous_model_files, write_repo

__all__ = [
    "PackageResult", "RepoPlan", "TritonState", "TritonTensor", "check_model_name", "check_repository",
    "check_state_pairing", "config_pbtxt", "default_model_name", "initial_state_bytes", "model_io",
    "package_triton", "parse_config", "plan_repo", "previous_model_files", "refuse_unsupported", "write_repo",
]
