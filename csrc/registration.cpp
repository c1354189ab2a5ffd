// Every schema of the mamba_ext library, grouped by op family. This file is the API: kernels
// register their CPU and CUDA implementations with TORCH_LIBRARY_IMPL in each family's host file,
// and mamba_ext/ops/ registers the fake kernels and autograd formulas in Python.
//
// Shape names: batch, dim (channels), seqlen, dstate (state size), ngroups (B and C shared by
// dim / ngroups channels or nheads / ngroups heads), nheads, headdim, width (conv taps).
// Optional gradients the caller did not ask for come back as empty tensors (numel 0).
#include <torch/library.h>

TORCH_LIBRARY(mamba_ext, m) {
  // Selective scan (Mamba-1), mamba-ssm's selective_scan_fn plus initial_state and packed
  // variable-length batches.
  //   u, delta, z: (batch, dim, seqlen); A: (dim, dstate); D, delta_bias: (dim,)
  //   B, C: (batch, ngroups, dstate, seqlen) or (batch, dstate, seqlen) when they vary per token,
  //         (dim, dstate) when constant
  //   seq_idx: (batch, seqlen) int32, the sequence of each token; the state restarts where it
  //         changes, -1 marks padding (out 0, state 0)
  //   num_sequences: 0 for per-row states: initial_state and last_state (batch, dim, dstate),
  //         the first sequence of a row starts from initial_state[b]; N > 0 (needs seq_idx, values
  //         in [-1, N)) for per-sequence states: initial_state and last_state (N, dim, dstate)
  //   out: (batch, dim, seqlen) in u's dtype; last_state in A's dtype.
  //   checkpoints: with return_checkpoints on CUDA, the state before every 16th token, (batch,
  //         dim, ceil(seqlen / 16), dstate) in A's dtype, for selective_scan_bwd (which saves
  //         a forward pass with them); empty otherwise.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor? seq_idx, int num_sequences, "
      "bool delta_softplus, bool return_checkpoints=False) -> (Tensor out, Tensor last_state, "
      "Tensor checkpoints)");
  // Gradients of selective_scan_fwd for every input; dD, dz, ddelta_bias, dinitial_state are
  // empty when the matching input is absent. dlast_state has last_state's shape. checkpoints:
  // the forward's (CUDA; ignored on the CPU), or None or empty to recompute them.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, "
      "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, "
      "Tensor? seq_idx, int num_sequences, bool delta_softplus, Tensor? checkpoints=None) -> "
      "(Tensor du, Tensor ddelta, "
      "Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, "
      "Tensor dinitial_state)");

  // Causal depthwise conv1d, causal-conv1d's causal_conv1d_fn.
  //   x: (batch, dim, seqlen), contiguous or channel-last (stride 1 on dim); weight: (dim, width);
  //   bias: (dim,); seq_idx: (batch, seqlen) int32, -1 marks padding; initial_states:
  //   (batch, dim, width - 1). out has x's shape and layout; final_states is
  //   (batch, dim, width - 1) when return_final_states, else empty.
  m.def(
      "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
      "Tensor? initial_states, bool return_final_states, bool silu) "
      "-> (Tensor out, Tensor final_states)");
  // Gradients of causal_conv1d_fwd; dbias and dinitial_states are empty when the input is absent.
  m.def(
      "causal_conv1d_bwd(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor weight, "
      "Tensor? bias, Tensor? seq_idx, Tensor? initial_states, bool silu) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)");
  // One decode step (or several tokens) of the conv against a rolling state, updated in place.
  //   x: (batch, dim) or (batch, dim, seqlen); conv_state: (state_batch, dim, state_len) with
  //   state_len >= width - 1; cache_seqlens: (batch,) int32, circular-buffer mode;
  //   conv_state_indices: (batch,) int32, the conv_state row of each batch entry.
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "Tensor? cache_seqlens, Tensor? conv_state_indices, bool silu) -> Tensor");

  // One recurrent step of the selective SSM, updating the state in place (mamba-ssm's
  // selective_state_update). Mamba-1: state (state_batch, dim, dstate), x/dt/z (batch, dim),
  // A (dim, dstate), B/C (batch, dstate) or (batch, ngroups, dstate), D/dt_bias (dim,).
  // Mamba-2: state (state_batch, nheads, headdim, dstate), x/dt/z (batch, nheads, headdim),
  // A (nheads, headdim, dstate), B/C (batch, ngroups, dstate), D/dt_bias (nheads, headdim);
  // A, dt, dt_bias and D may be broadcast over headdim and dstate with stride 0.
  // state_batch_indices: (batch,) int32, the state row of each batch entry.
  // Several tokens (a speculative draft): x/dt/z (batch, seqlen, ...) and B/C (batch, seqlen,
  // ...), applied in order; intermediate_states_buffer (rows, seqlen, ...state dims) receives the
  // state after each token, at row intermediate_state_indices[b] (or b); disable_state_update
  // leaves the state as it was (a draft verified before it is committed). FlashInfer's names.
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? state_batch_indices, "
      "bool dt_softplus, Tensor(b!)? intermediate_states_buffer=None, "
      "Tensor? intermediate_state_indices=None, bool disable_state_update=False) -> Tensor");
}
