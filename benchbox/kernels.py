"""Small C kernels, built once with the system C compiler into the cache folder and called through ctypes.

Each has a plain torch path beside it, taken where no compiler builds the library (or ``BENCHBOX_C_KERNELS=off``),
on other devices and dtypes, and, for the bit-for-bit ones, wherever the self-check at first use disagrees with
torch; the tests hold each kernel to its torch path. This module imports torch only inside its functions:
``blas.py`` uses ``build_library`` before torch loads.

- ``dropout_noise``: torch's CPU dropout noise from torch's own generator stream, bit for bit. torch's CPU
  ``bernoulli_(q)`` draws one float64 ``uniform_`` per element from the default generator's mt19937, one 64-bit
  draw at a time (~3.4 ns an element here: 406 us for a study step's 204 x 10 x 64 floats, five a step). The
  kernel runs the same mt19937 (regeneration and tempering vectorised), pairs its outputs into the same 53-bit
  doubles, compares them with q, writes the noise in the tensor's memory order and stores the generator's state
  back, where ``bernoulli_`` leaves it: every run keeps its random stream.
- ``rows_add``: the embedding's and gather_rows' table gradients, torch's order without its per-row call; bit for bit.
- ``din_relu_matvec``, ``din_threshold_sums``, ``din_tcr_sums``: DIN's passes over its pairs, fused.
- ``rmsnorm_forward``, ``rmsnorm_backward``: RMSNorm's forward and backward, each in one pass.
- ``sigmoid_project``, ``sigmoid_project_backward``: ComiRec-SA's sigmoid and its rank-K product, fused.
- ``pool_score``, ``pool_score_backward``: ComiRec-SA's interests and best-interest scores at a row's end.
- ``dr_score``, ``dr_score_backward``: ComiRec-DR's routing (shared maps) and best-interest scores at a row's end.
- ``cand_dot``, ``cand_dot_backward``: readouts.candidate_dot for few candidates a row, without (R, C, D) temporaries.
- ``dr_route_causal``: ComiRec-DR's causal routing rounds (shared maps, no gradient), a block of targets at a time.
- ``causal_pool``, ``causal_pool_backward``: ComiRec-SA's causal interests, an online softmax over the positions.
- ``gelu``: the exact (erf) GELU and, for the backward, its derivative, in one pass (the FFNs, the target tower).
- ``gru_cell``, ``gru_cell_backward``: one GRU time step's gates, forward and backward.
- ``ttt_dual_forward``, ``ttt_dual_backward``: TTT-Linear's dual form inside one mini-batch, around its GEMMs;
  ``lnl2_forward``, ``lnl2_vjp``: its inner loss gradient G and G's VJP alone (the last-position block).
- ``ttt_window_forward``, ``ttt_window_backward``: TTT-Linear's whole layer between its projection and its post-norm,
  its scan's chunks in turn with the inner weights carried between them, per (row, head) block.
- ``mlp_chunk_forward``, ``mlp_chunk_backward``: TTT-MLP's chunk of one mini-batch per (row, head) block, its
  intermediates in cache; the backward recomputes the forward.
- ``selective_scan_forward``, ``selective_scan_backward``, ``conv_silu_forward``, ``conv_silu_backward``: Mamba's
  selective scan with its D skip and silu gate (lanes over d_inner, the state checkpointed every 16 steps) and its
  causal depthwise conv with SiLU in the (B, L, D) layout.
The threaded ones (the last three groups, and gelu, cand_dot, dr_route_causal, causal_pool) split their batch in one
OpenMP loop (``PARTS``) on torch's own threads.
All but the dropout and rows kernels sum in another order than torch's ops (float rounding), so rows record which
ran (``cpu_kernels``, ``kernels_in_force``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

KERNELS_ENV = "BENCHBOX_C_KERNELS"  # "off": torch's own paths everywhere
# the -march the library is built for (default native). The float kernels' lane width follows it (VL: 16 with
# AVX-512, 8 with AVX, else 4); the tests build x86-64 (4 lanes), x86-64-v3 (8) and x86-64-v3 with 16 lanes
# (LANES_ENV) beside the native one.
MARCH_ENV = "BENCHBOX_C_MARCH"
# tests only: the float lane width whatever the target (16 built for AVX2 runs the AVX-512 build's code, slowly)
LANES_ENV = "BENCHBOX_C_LANES"

_SOURCE = r"""
/* benchbox (benchbox/kernels.py): torch's CPU dropout noise from torch's own mt19937 stream.
   state: the bytes of torch.Generator.get_state() (CPUGeneratorImplStateLegacy first: uint64 seed,
   int32 left, int32 seeded, uint64 next, uint64 state[624], ...), read and written in place. */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define MT_N 624
#define MT_M 397

static void regenerate(uint32_t *mt) {
    /* torch's mt19937 next_state, as three loops the compiler vectorises (read distances 1 and 397,
       then 227 back into the new values) */
    int i;
    for (i = 0; i < MT_N - MT_M; i++) {
        uint32_t y = (mt[i] & 0x80000000u) | (mt[i + 1] & 0x7fffffffu);
        mt[i] = mt[i + MT_M] ^ (y >> 1) ^ ((mt[i + 1] & 1u) ? 0x9908b0dfu : 0u);
    }
    for (; i < MT_N - 1; i++) {
        uint32_t y = (mt[i] & 0x80000000u) | (mt[i + 1] & 0x7fffffffu);
        mt[i] = mt[i + MT_M - MT_N] ^ (y >> 1) ^ ((mt[i + 1] & 1u) ? 0x9908b0dfu : 0u);
    }
    uint32_t y = (mt[MT_N - 1] & 0x80000000u) | (mt[0] & 0x7fffffffu);
    mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> 1) ^ ((mt[0] & 1u) ? 0x9908b0dfu : 0u);
}

static void temper(const uint32_t *restrict from, uint32_t *restrict to, int64_t k) {
    for (int64_t i = 0; i < k; i++) {
        uint32_t y = from[i];
        y ^= (y >> 11);
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= (y >> 18);
        to[i] = y;
    }
}

#define CHUNK 2048  /* doubles a pass: 4,096 outputs, 16 KiB */

int benchbox_dropout_noise(unsigned char *state, void *out, int64_t n, double keep, double kept_value,
                           int out_is_double) {
    uint32_t mt[MT_N];
    uint32_t stream[2 * CHUNK];
    uint64_t *legacy = (uint64_t *)(state + 24);
    int32_t left = *(int32_t *)(state + 8);
    uint64_t next = *(uint64_t *)(state + 16);
    if (left < 1 || left > MT_N || next > MT_N) return 1;
    for (int i = 0; i < MT_N; i++) mt[i] = (uint32_t)legacy[i];
    int64_t avail = left - 1, pos = (int64_t)next;  /* outputs left in mt from pos before a regeneration */
    float kept_f = (float)kept_value;
    /* ceil(keep 2^53) in [0, 2^53]: never kept for keep <= 0 (or NaN), always for keep >= 1 */
    const uint64_t thr = keep > 0 ? (keep < 1 ? (uint64_t)ceil(keep * 0x1p53) : 1ull << 53) : 0;
    const uint32_t thr_hi = (uint32_t)(thr >> 32), thr_lo = (uint32_t)thr;
    for (int64_t done = 0; done < n; done += CHUNK) {
        int64_t m = n - done < CHUNK ? n - done : CHUNK;
        for (int64_t got = 0; got < 2 * m;) {
            if (avail == 0) { regenerate(mt); pos = 0; avail = MT_N; }
            int64_t k = 2 * m - got < avail ? 2 * m - got : avail;
            temper(mt + pos, stream + got, k);
            pos += k; avail -= k; got += k;
        }
        /* random64() = first output << 32 | second; uniform_ = its low 53 bits r * 2^-53 (exact), kept where
           uniform_ < keep, i.e. where r < keep 2^53, i.e. where r < thr = ceil(keep 2^53) (r an integer; keep 2^53
           exact). Compared as integers in 32-bit halves: r's high 21 bits against thr's, then the low 32. (The
           double compare wants a 64-bit integer to double conversion, which AVX2 lacks: the compiler made it
           scalar, 4.7 ns an element on a Zen 3 against 0.84 now; with AVX-512 both vectorise.) */
        if (out_is_double) {
            double *o = (double *)out + done;
            for (int64_t i = 0; i < m; i++) {
                const uint32_t hi = stream[2 * i] & 0x1fffffu, lo = stream[2 * i + 1];
                o[i] = (hi < thr_hi) | ((hi == thr_hi) & (lo < thr_lo)) ? kept_value : 0.0;
            }
        } else {
            float *o = (float *)out + done;
            for (int64_t i = 0; i < m; i++) {
                const uint32_t hi = stream[2 * i] & 0x1fffffu, lo = stream[2 * i + 1];
                o[i] = (hi < thr_hi) | ((hi == thr_hi) & (lo < thr_lo)) ? kept_f : 0.0f;
            }
        }
    }
    for (int i = 0; i < MT_N; i++) legacy[i] = mt[i];
    *(int32_t *)(state + 8) = (int32_t)(avail + 1);
    *(uint64_t *)(state + 16) = (uint64_t)pos;
    return 0;
}

/* out = 0, then out[idx[i]] += src[i] for i = 0, 1, ..., n - 1 in that order, rows of d, skipping
   idx[i] == skip: the order in which torch's CPU embedding_dense_backward and index_add_ sum one row's
   contributions into zeros, without their per-row TensorIterator call (~50-80 ns a row). Returns 1, having
   written nothing, on an index out of range. */
#define ROWS_ADD(name, T)                                                                               \
int name(T *out, int64_t n_out, int64_t d, const int64_t *idx, int64_t n, const T *src, int64_t skip) { \
    for (int64_t i = 0; i < n; i++)                                                                     \
        if (idx[i] != skip && (idx[i] < 0 || idx[i] >= n_out)) return 1;                                \
    memset(out, 0, (size_t)(n_out * d) * sizeof(T));  /* torch's fill_ of the zeros ran at ~11 GB/s */  \
    for (int64_t i = 0; i < n; i++) {                                                                   \
        if (idx[i] == skip) continue;                                                                   \
        T *restrict o = out + idx[i] * d;                                                               \
        const T *restrict s = src + i * d;                                                              \
        for (int64_t j = 0; j < d; j++) o[j] += s[j];                                                   \
    }                                                                                                   \
    return 0;                                                                                           \
}
ROWS_ADD(benchbox_rows_add_f32, float)
ROWS_ADD(benchbox_rows_add_f64, double)

/* DIN's pairs (readouts._DINPairs), z laid out (M, H, S), M = B N: z := max(z, 0) in place and
   y[m, s] += sum_h w[h] z[m, h, s], in one pass over z where torch makes two (relu_, then a batched
   matrix-vector product that reads z again). */
#define DIN_RELU_MATVEC(name, T)                                                                        \
void name(T *z, const T *w, T *y, int64_t m_all, int64_t hid, int64_t s) {                              \
    for (int64_t m = 0; m < m_all; m++) {                                                               \
        T *restrict ym = y + m * s;                                                                     \
        for (int64_t h = 0; h < hid; h++) {                                                             \
            T *restrict zr = z + (m * hid + h) * s;                                                     \
            const T wh = w[h];                                                                          \
            for (int64_t j = 0; j < s; j++) {                                                           \
                T v = zr[j] < 0 ? 0 : zr[j];                                                            \
                zr[j] = v;                                                                              \
                ym[j] += wh * v;                                                                        \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}
DIN_RELU_MATVEC(benchbox_din_relu_matvec_f32, float)
DIN_RELU_MATVEC(benchbox_din_relu_matvec_f64, double)

/* The backward's tb = gy [z > 0] (torch's threshold_backward: 0 where z <= 0), gy (B, N, S) broadcast over
   H, with its sums over s (tb_s, (B, N, H)) and over n (tb_n, (B, H, S)), in one pass over z where torch
   makes three (threshold_backward, then two sums that read tb again). */
#define DIN_THRESHOLD_SUMS(name, T)                                                                     \
void name(const T *z, const T *gy, T *tb, T *tb_s, T *tb_n, int64_t b_all, int64_t n_all, int64_t hid,  \
          int64_t s) {                                                                                  \
    for (int64_t b = 0; b < b_all; b++) {                                                               \
        T *restrict nb = tb_n + b * hid * s;                                                            \
        for (int64_t i = 0; i < hid * s; i++) nb[i] = 0;                                                \
        for (int64_t n = 0; n < n_all; n++) {                                                           \
            const int64_t m = b * n_all + n;                                                            \
            const T *restrict g = gy + m * s;                                                           \
            for (int64_t h = 0; h < hid; h++) {                                                         \
                const T *restrict zr = z + (m * hid + h) * s;                                           \
                T *restrict tr = tb + (m * hid + h) * s;                                                \
                T *restrict nr = nb + h * s;                                                            \
                for (int64_t j = 0; j < s; j++) {                                                       \
                    T t = zr[j] <= 0 ? 0 : g[j];                                                        \
                    tr[j] = t;                                                                          \
                    nr[j] += t;                                                                         \
                }                                                                                       \
                T acc[16] = {0};  /* 16 running sums: a loop the compiler vectorises */                 \
                int64_t j = 0;                                                                          \
                for (; j + 16 <= s; j += 16)                                                            \
                    for (int k = 0; k < 16; k++) acc[k] += tr[j + k];                                   \
                for (; j < s; j++) acc[0] += tr[j];                                                     \
                T total = 0;                                                                            \
                for (int k = 0; k < 16; k++) total += acc[k];                                           \
                tb_s[m * hid + h] = total;                                                              \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}
DIN_THRESHOLD_SUMS(benchbox_din_threshold_sums_f32, float)
DIN_THRESHOLD_SUMS(benchbox_din_threshold_sums_f64, double)

/* The backward's two reductions of tcr (B N, H, D): out_bn[m, d] = sum_h tcr[m, h, d] r1[h, d] and
   out_hd[h, d] = sum_m tcr[m, h, d] cand[m, d], in one read of tcr where torch makes two products and two
   sums (four passes over (B N, H, D)). */
#define DIN_TCR_SUMS(name, T)                                                                           \
void name(const T *tcr, const T *r1, const T *cand, T *out_bn, T *out_hd, int64_t m_all, int64_t hid,  \
          int64_t d) {                                                                                  \
    for (int64_t i = 0; i < hid * d; i++) out_hd[i] = 0;                                                \
    for (int64_t m = 0; m < m_all; m++) {                                                               \
        T *restrict ob = out_bn + m * d;                                                                \
        const T *restrict c = cand + m * d;                                                             \
        for (int64_t j = 0; j < d; j++) ob[j] = 0;                                                      \
        for (int64_t h = 0; h < hid; h++) {                                                             \
            const T *restrict row = tcr + (m * hid + h) * d;                                            \
            const T *restrict rr = r1 + h * d;                                                          \
            T *restrict oh = out_hd + h * d;                                                            \
            for (int64_t j = 0; j < d; j++) {                                                           \
                ob[j] += row[j] * rr[j];                                                                \
                oh[j] += row[j] * c[j];                                                                 \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}
DIN_TCR_SUMS(benchbox_din_tcr_sums_f32, float)
DIN_TCR_SUMS(benchbox_din_tcr_sums_f64, double)

/* RMSNorm's backward (model._RMSNormFunction) for rows of d, one pass: with gw = g w,
   gx = (gw - xhat mean(gw xhat)) rstd, and g_weight = sum over rows of g xhat (accumulated in row order).
   torch makes five passes (g w, the row dot products, addcmul, the product with rstd, g xhat and its sum). */
#define RMSNORM_BACKWARD(name, T)                                                                       \
void name(const T *g, const T *xhat, const T *rstd, const T *w, T *gx, T *g_weight, int64_t rows,       \
          int64_t d) {                                                                                  \
    for (int64_t j = 0; j < d; j++) g_weight[j] = 0;                                                    \
    for (int64_t r = 0; r < rows; r++) {                                                                \
        const T *restrict gr = g + r * d;                                                               \
        const T *restrict xr = xhat + r * d;                                                            \
        T *restrict out = gx + r * d;                                                                   \
        T *restrict gwt = g_weight;                                                                     \
        T acc[16] = {0};                                                                                \
        int64_t j = 0;                                                                                  \
        for (; j + 16 <= d; j += 16)                                                                    \
            for (int k = 0; k < 16; k++) acc[k] += gr[j + k] * w[j + k] * xr[j + k];                    \
        for (; j < d; j++) acc[0] += gr[j] * w[j] * xr[j];                                              \
        T dot = 0;                                                                                      \
        for (int k = 0; k < 16; k++) dot += acc[k];                                                     \
        const T c = -dot / (T)d, s = rstd[r];                                                           \
        for (j = 0; j < d; j++) {                                                                       \
            out[j] = (gr[j] * w[j] + xr[j] * c) * s;                                                    \
            gwt[j] += gr[j] * xr[j];                                                                    \
        }                                                                                               \
    }                                                                                                   \
}
RMSNORM_BACKWARD(benchbox_rmsnorm_backward_f32, float)
RMSNORM_BACKWARD(benchbox_rmsnorm_backward_f64, double)

/* ComiRec-SA's logits (readouts.ComiRecSAReadout._logits): s = sigmoid(u) for rows of hd and a = s w^T for
   w (k, hd), in one pass over u where torch makes two (sigmoid, then a product that reads s again); and the
   backward, gu = (ga w) s (1 - s) and gw = ga^T s, in one pass over s where torch makes three (the rank-k
   product, sigmoid_backward, the weight's product). float: VL lanes at a time with the compiler's vector
   types (hd a multiple of 16) and an exp of our own (Cephes' reduction and polynomial, about 1 ulp; torch's
   sigmoid differs by float rounding); double: plain loops and the C library's exp. gw sums its rows in
   blocks of 64, then the blocks. */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
/* VL, the float lanes of the machine's widest vector registers: every float kernel steps by VL (the sizes they
   take are multiples of 16). A vector wider than the machine's registers is what gcc handles worst: with 16 lanes
   on AVX2 it keeps them in memory and moves them through general registers (the TTT-Linear step 2.3x slower than
   torch's on a Zen 3, measured), so the width follows the target. BENCHBOX_VL (tests only) sets it: 16 lanes built
   for AVX2 run the AVX-512 build's code, slowly, on a machine without AVX-512. */
#ifndef BENCHBOX_VL
#if defined(__AVX512F__)
#define BENCHBOX_VL 16
#elif defined(__AVX__)
#define BENCHBOX_VL 8
#else
#define BENCHBOX_VL 4
#endif
#endif
#if BENCHBOX_VL == 16
#define VL 16
#define V_IOTA {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#define V_EVENS {0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14}
#define V_ODDS {1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15}
#define V_SWAP {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}
#define V_ALT {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1}
#define V_BITREV {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15}
#define V_H8A {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
#define V_H8B {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}
#define V_H4A {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}
#define V_H4B {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}
#define V_H2A {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}
#define V_H2B {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}
#define V_H1A {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}
#define V_H1B {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}
#define V_ZIPLO {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23}
#define V_ZIPHI {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}
#elif BENCHBOX_VL == 8
#define VL 8
#define V_IOTA {0, 1, 2, 3, 4, 5, 6, 7}
#define V_EVENS {0, 0, 2, 2, 4, 4, 6, 6}
#define V_ODDS {1, 1, 3, 3, 5, 5, 7, 7}
#define V_SWAP {1, 0, 3, 2, 5, 4, 7, 6}
#define V_ALT {-1, 1, -1, 1, -1, 1, -1, 1}
#define V_BITREV {0, 4, 2, 6, 1, 5, 3, 7}
#define V_H4A {0, 1, 2, 3, 8, 9, 10, 11}
#define V_H4B {4, 5, 6, 7, 12, 13, 14, 15}
#define V_H2A {0, 1, 8, 9, 4, 5, 12, 13}
#define V_H2B {2, 3, 10, 11, 6, 7, 14, 15}
#define V_H1A {0, 8, 2, 10, 4, 12, 6, 14}
#define V_H1B {1, 9, 3, 11, 5, 13, 7, 15}
#define V_ZIPLO {0, 8, 1, 9, 2, 10, 3, 11}
#define V_ZIPHI {4, 12, 5, 13, 6, 14, 7, 15}
#else  /* SSE, NEON */
#define VL 4
#define V_IOTA {0, 1, 2, 3}
#define V_EVENS {0, 0, 2, 2}
#define V_ODDS {1, 1, 3, 3}
#define V_SWAP {1, 0, 3, 2}
#define V_ALT {-1, 1, -1, 1}
#define V_BITREV {0, 2, 1, 3}
#define V_H2A {0, 1, 4, 5}
#define V_H2B {2, 3, 6, 7}
#define V_H1A {0, 4, 2, 6}
#define V_H1B {1, 5, 3, 7}
#define V_ZIPLO {0, 4, 1, 5}
#define V_ZIPHI {2, 6, 3, 7}
#endif
int benchbox_lanes(void) { return VL; }
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
static inline vf ldv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stv(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsumv(vf v) {  /* a tree: a chain of 16 dependent adds costs ~50 cycles a sum */
#if VL == 16
    const float a = (v[0] + v[8]) + (v[4] + v[12]), b = (v[2] + v[10]) + (v[6] + v[14]);
    const float c = (v[1] + v[9]) + (v[5] + v[13]), d = (v[3] + v[11]) + (v[7] + v[15]);
    return (a + b) + (c + d);
#elif VL == 8
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#else
    return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}
/* VL sums at once: lane i of the result is hsumv(s[V_BITREV[i]]), bit for bit (the same tree: lanes i + VL/2 first,
   then i + VL/4, ... i + 1), in log2(VL) levels of two shuffles and an add over pairs of vectors (VL separate hsumv
   cost ~7 VL operations, this ~3 VL). Level h pairs lane i with i + h: x's sums in the lanes where i % 2h < h, y's in
   the others. s is overwritten. */
#define V_PAIR_SUMS(x, y, A, B) (__builtin_shuffle(x, y, (vi)A) + __builtin_shuffle(x, y, (vi)B))
static inline vf hsum_lanes(vf *s) {
#if VL == 16
    for (int j = 0; j < 8; j++) s[j] = V_PAIR_SUMS(s[2 * j], s[2 * j + 1], V_H8A, V_H8B);
#endif
#if VL >= 8
    for (int j = 0; j < 4; j++) s[j] = V_PAIR_SUMS(s[2 * j], s[2 * j + 1], V_H4A, V_H4B);
#endif
    for (int j = 0; j < 2; j++) s[j] = V_PAIR_SUMS(s[2 * j], s[2 * j + 1], V_H2A, V_H2B);
    return V_PAIR_SUMS(s[0], s[1], V_H1A, V_H1B);
}

static inline vf clampv(vf x, float lo, float hi) {
#if defined(__AVX512F__) && VL == 16
    __m512 m;
    memcpy(&m, &x, sizeof m);
    m = _mm512_min_ps(_mm512_max_ps(m, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
    memcpy(&x, &m, sizeof m);
    return x;
#else
    vi below = x < lo, above = x > hi;
    vf l = (vf){0} + lo, h = (vf){0} + hi;
    x = (vf)(((vi)l & below) | ((vi)x & ~below));
    return (vf)(((vi)h & above) | ((vi)x & ~above));
#endif
}

/* exp of n <= EXPV_MAX vectors in lockstep, each step a loop over them (unrolled for a constant n, so their
   instructions interleave: one vector's exp is a chain of ~15 dependent steps); x clamped to [-87, 88]: no overflow
   of the exponent bits. Cephes' reduction and polynomial, about 1 ulp. */
#define EXPV_MAX 4
static inline void expv_n(vf *x, int n) {
    vf k[EXPV_MAX], r[EXPV_MAX], p[EXPV_MAX];
    for (int j = 0; j < n; j++) x[j] = clampv(x[j], -87.0f, 88.0f);
    for (int j = 0; j < n; j++) k[j] = (x[j] * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* nearest */
    for (int j = 0; j < n; j++) r[j] = x[j] - k[j] * 0.693359375f;
    for (int j = 0; j < n; j++) r[j] = r[j] + k[j] * 2.12194440e-4f;
    for (int j = 0; j < n; j++) p[j] = r[j] * 1.9875691500e-4f + 1.3981999507e-3f;
    for (int j = 0; j < n; j++) p[j] = p[j] * r[j] + 8.3334519073e-3f;
    for (int j = 0; j < n; j++) p[j] = p[j] * r[j] + 4.1665795894e-2f;
    for (int j = 0; j < n; j++) p[j] = p[j] * r[j] + 1.6666665459e-1f;
    for (int j = 0; j < n; j++) p[j] = p[j] * r[j] + 5.0000001201e-1f;
    for (int j = 0; j < n; j++) p[j] = p[j] * (r[j] * r[j]) + r[j] + 1.0f;
    for (int j = 0; j < n; j++) x[j] = p[j] * (vf)((__builtin_convertvector(k[j], vi) + 127) << 23);
}
static inline vf expv(vf x) {
    expv_n(&x, 1);
    return x;
}

void benchbox_sigmoid_project_f32(const float *u, const float *w, float *s, float *a, int64_t n, int64_t hd,
                                  int64_t k) {
    for (int64_t i = 0; i < n; i++) {
        const float *ur = u + i * hd;
        float *sr = s + i * hd;
        if (k == 4) {  /* ComiRec's four interests: the products ride along the sigmoid's pass */
            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t j = 0; j < hd; j += VL) {
                vf sv = 1.0f / (1.0f + expv(-ldv(ur + j)));
                stv(sr + j, sv);
                a0 += sv * ldv(w + j);
                a1 += sv * ldv(w + hd + j);
                a2 += sv * ldv(w + 2 * hd + j);
                a3 += sv * ldv(w + 3 * hd + j);
            }
            a[i * 4] = hsumv(a0); a[i * 4 + 1] = hsumv(a1); a[i * 4 + 2] = hsumv(a2); a[i * 4 + 3] = hsumv(a3);
            continue;
        }
        for (int64_t j = 0; j < hd; j += VL) stv(sr + j, 1.0f / (1.0f + expv(-ldv(ur + j))));
        for (int64_t q = 0; q < k; q++) {
            vf acc = {0};
            for (int64_t j = 0; j < hd; j += VL) acc += ldv(sr + j) * ldv(w + q * hd + j);
            a[i * k + q] = hsumv(acc);
        }
    }
}

void benchbox_sigmoid_project_f64(const double *u, const double *w, double *s, double *a, int64_t n,
                                  int64_t hd, int64_t k) {
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < hd; j++) s[i * hd + j] = 1.0 / (1.0 + exp(-u[i * hd + j]));
        for (int64_t q = 0; q < k; q++) {
            double acc = 0;
            for (int64_t j = 0; j < hd; j++) acc += s[i * hd + j] * w[q * hd + j];
            a[i * k + q] = acc;
        }
    }
}

/* One GRU time step's gates (mixers.gru._GRUSequence), torch's GRU conventions: with gi = x W_ih^T + b_ih and
   gh = h W_hh^T + b_hh, each (B, 3H) in the order r, z, n,
     r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n), h' = (1 - z) n + z h,
   in one pass where torch's CPU GRU cell makes about a dozen (chunks, adds, sigmoid_, tanh_, products).
   r, z, n and gh_n are kept for the backward. Rows of gi and h' are strided (the time step of (B, L, .)). */
static inline vf sigmoidv(vf x) { return 1.0f / (1.0f + expv(-x)); }

void benchbox_gru_cell_f32(const float *gi, int64_t gi_stride, const float *gh, const float *h, int64_t h_stride,
                           float *h_out, int64_t out_stride, float *r, float *z, float *n, float *ghn, int64_t rows,
                           int64_t hid) {
    for (int64_t b = 0; b < rows; b++) {
        const float *gib = gi + b * gi_stride, *ghb = gh + b * 3 * hid;
        for (int64_t j = 0; j < hid; j += VL) {
            const vf rv = sigmoidv(ldv(gib + j) + ldv(ghb + j));
            const vf zv = sigmoidv(ldv(gib + hid + j) + ldv(ghb + hid + j));
            const vf gn = ldv(ghb + 2 * hid + j);
            const vf nv = 2.0f * sigmoidv(2.0f * (ldv(gib + 2 * hid + j) + rv * gn)) - 1.0f;  /* tanh */
            const vf hv = h ? ldv(h + b * h_stride + j) : (vf){0};
            stv(h_out + b * out_stride + j, (1.0f - zv) * nv + zv * hv);
            stv(r + b * hid + j, rv);
            stv(z + b * hid + j, zv);
            stv(n + b * hid + j, nv);
            stv(ghn + b * hid + j, gn);
        }
    }
}

void benchbox_gru_cell_f64(const double *gi, int64_t gi_stride, const double *gh, const double *h,
                           int64_t h_stride, double *h_out, int64_t out_stride, double *r, double *z, double *n,
                           double *ghn, int64_t rows, int64_t hid) {
    for (int64_t b = 0; b < rows; b++) {
        const double *gib = gi + b * gi_stride, *ghb = gh + b * 3 * hid;
        for (int64_t j = 0; j < hid; j++) {
            const double rv = 1.0 / (1.0 + exp(-(gib[j] + ghb[j])));
            const double zv = 1.0 / (1.0 + exp(-(gib[hid + j] + ghb[hid + j])));
            const double gn = ghb[2 * hid + j];
            const double nv = tanh(gib[2 * hid + j] + rv * gn);
            const double hv = h ? h[b * h_stride + j] : 0.0;
            h_out[b * out_stride + j] = (1.0 - zv) * nv + zv * hv;
            r[b * hid + j] = rv;
            z[b * hid + j] = zv;
            n[b * hid + j] = nv;
            ghn[b * hid + j] = gn;
        }
    }
}

/* Its backward: from dh' (B, H) (the output's gradient plus what flows back from step t + 1), the gates'
   gradients d_gi (B, 3H, rows strided) and d_gh (B, 3H), and z dh' + gy_prev (the output gradient of step
   t - 1, rows strided; none at t = 0) into dh_prev, to which the caller adds d_gh W_hh. d_gi and d_gh differ
   only in n: d_gi_n = dn (1 - n^2), d_gh_n = that times r. */
#define GRU_CELL_BACKWARD(name, T)                                                                      \
void name(const T *dh, const T *h, int64_t h_stride, const T *r, const T *z, const T *n, const T *ghn,   \
          const T *gy_prev, int64_t gy_stride, T *dgi, int64_t dgi_stride, T *dgh, T *dh_prev,           \
          int64_t rows, int64_t hid) {                                                                  \
    for (int64_t b = 0; b < rows; b++) {                                                                \
        const T *restrict dhb = dh + b * hid, *restrict rb = r + b * hid, *restrict zb = z + b * hid;   \
        const T *restrict nb = n + b * hid, *restrict gnb = ghn + b * hid;                              \
        const T *restrict hb = h ? h + b * h_stride : 0, *restrict yb = gy_prev ? gy_prev + b * gy_stride : 0; \
        T *restrict gi = dgi + b * dgi_stride, *restrict gh = dgh + b * 3 * hid;                        \
        T *restrict dp = dh_prev + b * hid;                                                             \
        for (int64_t j = 0; j < hid; j++) {                                                             \
            const T g = dhb[j], rv = rb[j], zv = zb[j], nv = nb[j];                                     \
            const T hv = hb ? hb[j] : (T)0;                                                             \
            const T an = g * ((T)1 - zv) * ((T)1 - nv * nv);                                            \
            const T ar = an * gnb[j] * rv * ((T)1 - rv);                                                \
            const T az = g * (hv - nv) * zv * ((T)1 - zv);                                              \
            gi[j] = ar; gi[hid + j] = az; gi[2 * hid + j] = an;                                         \
            gh[j] = ar; gh[hid + j] = az; gh[2 * hid + j] = an * rv;                                    \
            dp[j] = g * zv + (yb ? yb[j] : (T)0);                                                       \
        }                                                                                               \
    }                                                                                                   \
}
GRU_CELL_BACKWARD(benchbox_gru_cell_backward_f64, double)

void benchbox_gru_cell_backward_f32(const float *dh, const float *h, int64_t h_stride, const float *r,
                                    const float *z, const float *n, const float *ghn, const float *gy_prev,
                                    int64_t gy_stride, float *dgi, int64_t dgi_stride, float *dgh, float *dh_prev,
                                    int64_t rows, int64_t hid) {
    for (int64_t b = 0; b < rows; b++) {
        float *gi = dgi + b * dgi_stride, *gh = dgh + b * 3 * hid;
        const int64_t o = b * hid;
        for (int64_t j = 0; j < hid; j += VL) {
            const vf g = ldv(dh + o + j), rv = ldv(r + o + j), zv = ldv(z + o + j), nv = ldv(n + o + j);
            const vf hv = h ? ldv(h + b * h_stride + j) : (vf){0};
            const vf an = g * (1.0f - zv) * (1.0f - nv * nv);
            const vf ar = an * ldv(ghn + o + j) * rv * (1.0f - rv);
            const vf az = g * (hv - nv) * zv * (1.0f - zv);
            stv(gi + j, ar); stv(gi + hid + j, az); stv(gi + 2 * hid + j, an);
            stv(gh + j, ar); stv(gh + hid + j, az); stv(gh + 2 * hid + j, an * rv);
            stv(dh_prev + o + j, g * zv + (gy_prev ? ldv(gy_prev + b * gy_stride + j) : (vf){0}));
        }
    }
}

/* Causal attention of short sequences (mixers.attention._SmallAttention), per (b, h): query i sees keys
   0..n_i - 1, n_i = i + 1 (causal) or kv_len[b] (one query per row: the last position's). q, k, v and their
   gradients are read and written in place in the projections' layouts (strides in elements: per row b, per
   position t; a head h is h E further), so that no transpose is copied either way; out (B, Tq, H, E) and the
   probabilities p (B, H, Tq, T, zero where not seen) are contiguous. T <= 64; float: E a multiple of 16 up to
   128, its own exp (expv).
   torch's CPU SDPA at 204 x 2 heads x 10 x 32 spends ~1.5 ms a training step on blocking made for long
   sequences; this is a few dense loops. */
#define ATT_MAXT 64
#define SMALL_ATTENTION(name, T)                                                                        \
void name(const T *q, int64_t q_sb, int64_t q_st, const T *k, const T *v, int64_t kv_sb, int64_t kv_st,  \
          const int64_t *kv_len, T *out, T *p, int64_t rows, int64_t tq, int64_t tk, int64_t heads,       \
          int64_t e, double scale) {                                                                    \
    for (int64_t b = 0; b < rows; b++)                                                                  \
        for (int64_t h = 0; h < heads; h++)                                                             \
            for (int64_t i = 0; i < tq; i++) {                                                          \
                const T *qi = q + b * q_sb + i * q_st + h * e;                                          \
                const int64_t n = kv_len ? kv_len[b] : i + 1;                                           \
                T *pi = p + ((b * heads + h) * tq + i) * tk;                                            \
                T m = -INFINITY, sum = 0;                                                               \
                for (int64_t j = 0; j < n; j++) {                                                       \
                    const T *kj = k + b * kv_sb + j * kv_st + h * e;                                    \
                    T dot = 0;                                                                          \
                    for (int64_t d = 0; d < e; d++) dot += qi[d] * kj[d];                               \
                    pi[j] = dot * (T)scale;                                                             \
                    m = pi[j] > m ? pi[j] : m;                                                          \
                }                                                                                       \
                for (int64_t j = 0; j < n; j++) { pi[j] = EXPF(pi[j] - m); sum += pi[j]; }              \
                for (int64_t j = n; j < tk; j++) pi[j] = 0;                                             \
                T *oi = out + ((b * tq + i) * heads + h) * e;                                           \
                for (int64_t d = 0; d < e; d++) oi[d] = 0;                                              \
                for (int64_t j = 0; j < n; j++) {                                                       \
                    const T w = pi[j] / sum;                                                            \
                    const T *vj = v + b * kv_sb + j * kv_st + h * e;                                    \
                    pi[j] = w;                                                                          \
                    for (int64_t d = 0; d < e; d++) oi[d] += w * vj[d];                                 \
                }                                                                                       \
            }                                                                                           \
}
/* The backward, with dk and dv (strided like k and v) zeroed first for the tk keys and accumulated:
   dv_j += p_ij do_i, dp_ij = do_i . v_j, ds_ij = p_ij (dp_ij - do_i . o_i), dq_i = scale sum_j ds_ij k_j,
   dk_j += scale ds_ij q_i. */
#define SMALL_ATTENTION_BACKWARD(name, T)                                                               \
void name(const T *q, int64_t q_sb, int64_t q_st, const T *k, const T *v, int64_t kv_sb, int64_t kv_st,  \
          const int64_t *kv_len, const T *out, const T *p, const T *dout, T *dq, T *dk, T *dv,            \
          int64_t rows, int64_t tq, int64_t tk, int64_t heads, int64_t e, double scale) {               \
    for (int64_t b = 0; b < rows; b++)                                                                  \
        for (int64_t h = 0; h < heads; h++) {                                                           \
            for (int64_t j = 0; j < tk; j++) {                                                          \
                T *dkj = dk + b * kv_sb + j * kv_st + h * e, *dvj = dv + b * kv_sb + j * kv_st + h * e;  \
                for (int64_t d = 0; d < e; d++) { dkj[d] = 0; dvj[d] = 0; }                             \
            }                                                                                           \
            for (int64_t i = 0; i < tq; i++) {                                                          \
                const T *qi = q + b * q_sb + i * q_st + h * e;                                          \
                const int64_t n = kv_len ? kv_len[b] : i + 1;                                           \
                const T *pi = p + ((b * heads + h) * tq + i) * tk;                                      \
                const T *oi = out + ((b * tq + i) * heads + h) * e;                                     \
                const T *gi = dout + ((b * tq + i) * heads + h) * e;                                    \
                T *dqi = dq + b * q_sb + i * q_st + h * e;                                              \
                T di = 0;                                                                               \
                for (int64_t d = 0; d < e; d++) { di += gi[d] * oi[d]; dqi[d] = 0; }                    \
                for (int64_t j = 0; j < n; j++) {                                                       \
                    const T *kj = k + b * kv_sb + j * kv_st + h * e, *vj = v + b * kv_sb + j * kv_st + h * e; \
                    T *dkj = dk + b * kv_sb + j * kv_st + h * e, *dvj = dv + b * kv_sb + j * kv_st + h * e;  \
                    const T pij = pi[j];                                                                \
                    T dp = 0;                                                                           \
                    for (int64_t d = 0; d < e; d++) { dp += gi[d] * vj[d]; dvj[d] += pij * gi[d]; }     \
                    const T ds = pij * (dp - di) * (T)scale;                                            \
                    for (int64_t d = 0; d < e; d++) { dqi[d] += ds * kj[d]; dkj[d] += ds * qi[d]; }     \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
}
#define EXPF exp
SMALL_ATTENTION(benchbox_small_attention_f64, double)
SMALL_ATTENTION_BACKWARD(benchbox_small_attention_backward_f64, double)
#undef EXPF

/* float: the same loops over VL lanes of E (a multiple of 16, at most 128) and of the keys (expv) */
static inline float dotv(const float *a, const float *b, int64_t e) {
    vf acc = ldv(a) * ldv(b);
    for (int64_t d = VL; d < e; d += VL) acc += ldv(a + d) * ldv(b + d);
    return hsumv(acc);
}
static inline void axpyv(float *y, float a, const float *x, int64_t e) {
    for (int64_t d = 0; d < e; d += VL) stv(y + d, ldv(y + d) + a * ldv(x + d));
}

static inline float hmaxv(vf v) {
#if VL != 16
    float m = v[0];
    for (int i = 1; i < VL; i++) m = fmaxf(m, v[i]);
    return m;
#else
    const float a = fmaxf(fmaxf(v[0], v[8]), fmaxf(v[4], v[12])), b = fmaxf(fmaxf(v[2], v[10]), fmaxf(v[6], v[14]));
    const float c = fmaxf(fmaxf(v[1], v[9]), fmaxf(v[5], v[13])), d = fmaxf(fmaxf(v[3], v[11]), fmaxf(v[7], v[15]));
    return fmaxf(fmaxf(a, b), fmaxf(c, d));
#endif
}

/* dst (C, R) = src (R, C)^T, rows of src ss apart and of dst ds apart. float: VL x VL tiles in registers, log2(VL)
   rounds of interleaving the rows i and i + VL/2 (a perfect shuffle; 3x the element by element copy on 128 x 32,
   measured), the edges element by element */
static void transpose_strided_f64(double *dst, int64_t ds, const double *src, int64_t ss, int64_t R, int64_t C) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++) dst[c * ds + r] = src[r * ss + c];
}
static void transpose_f64(double *dst, const double *src, int64_t R, int64_t C) {
    transpose_strided_f64(dst, R, src, C, R, C);
}
static void transpose_strided_f32(float *dst, int64_t ds, const float *src, int64_t ss, int64_t R, int64_t C) {
    const int64_t Rv = R / VL * VL, Cv = C / VL * VL;
    for (int64_t r0 = 0; r0 < Rv; r0 += VL)
        for (int64_t c0 = 0; c0 < Cv; c0 += VL) {
            vf x[VL], y[VL];
            for (int i = 0; i < VL; i++) x[i] = ldv(src + (r0 + i) * ss + c0);
            for (int round = 1; round < VL; round *= 2) {
                for (int i = 0; i < VL / 2; i++) {
                    y[2 * i] = __builtin_shuffle(x[i], x[i + VL / 2], (vi)V_ZIPLO);
                    y[2 * i + 1] = __builtin_shuffle(x[i], x[i + VL / 2], (vi)V_ZIPHI);
                }
                memcpy(x, y, sizeof x);
            }
            for (int i = 0; i < VL; i++) stv(dst + (c0 + i) * ds + r0, x[i]);
        }
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = r < Rv ? Cv : 0; c < C; c++) dst[c * ds + r] = src[r * ss + c];
}
static void transpose_f32(float *dst, const float *src, int64_t R, int64_t C) {
    transpose_strided_f32(dst, R, src, C, R, C);
}

static inline vf scoresv(const float *qi, const float *xt, int64_t e, int64_t w, int64_t j0) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};  /* four chains: one would wait on each FMA's latency */
    for (int64_t d = 0; d < e; d += 4) {
        a0 += qi[d] * ldv(xt + d * w + j0);
        a1 += qi[d + 1] * ldv(xt + (d + 1) * w + j0);
        a2 += qi[d + 2] * ldv(xt + (d + 2) * w + j0);
        a3 += qi[d + 3] * ldv(xt + (d + 3) * w + j0);
    }
    return (a0 + a1) + (a2 + a3);
}

static inline vi seenv(int64_t j0, int64_t n) {
    return ((vi)V_IOTA + (int32_t)j0) < (int32_t)n;
}

void benchbox_small_attention_f32(const float *q, int64_t q_sb, int64_t q_st, const float *k, const float *v,
                                  int64_t kv_sb, int64_t kv_st, const int64_t *kv_len, float *out, float *p,
                                  int64_t rows, int64_t tq, int64_t tk, int64_t heads, int64_t e, double scale) {
    float kt[128 * ATT_MAXT], prow[ATT_MAXT];
    const int64_t w = (tk + 15) & ~(int64_t)15;
    const vf low = (vf){0} - INFINITY;
    memset(kt, 0, sizeof(float) * e * w);
    for (int64_t b = 0; b < rows; b++)
        for (int64_t h = 0; h < heads; h++) {
            /* the keys transposed into kt (E, w), columns tk..w - 1 zeroed once: one query's scores for VL keys
               are then E broadcast products, no horizontal sum per key */
            transpose_strided_f32(kt, w, k + b * kv_sb + h * e, kv_st, tk, e);
            for (int64_t i = 0; i < tq; i++) {
                const float *qi = q + b * q_sb + i * q_st + h * e;
                const int64_t n = kv_len ? kv_len[b] : i + 1;
                vf sc[ATT_MAXT / VL];
                float m = -INFINITY;
                for (int64_t c = 0; c * VL < n; c++) {
                    const vi in = seenv(c * VL, n);
                    sc[c] = scoresv(qi, kt, e, w, c * VL) * (float)scale;
                    m = fmaxf(m, hmaxv((vf)(((vi)sc[c] & in) | ((vi)low & ~in))));
                }
                vf acc = {0};
                for (int64_t c = 0; c * VL < n; c++) {
                    sc[c] = (vf)((vi)expv(sc[c] - m) & seenv(c * VL, n));
                    acc += sc[c];
                }
                const float inv = 1.0f / hsumv(acc);
                for (int64_t c = 0; c * VL < w; c++) stv(prow + c * VL, c * VL < n ? sc[c] * inv : (vf){0});
                vf o[128 / VL] = {{0}};  /* the output row in registers (E <= 128) */
                for (int64_t j = 0; j < n; j++) {
                    const float *vj = v + b * kv_sb + j * kv_st + h * e;
                    for (int c = 0; c < 128 / VL; c++)
                        if (c * VL < e) o[c] += prow[j] * ldv(vj + c * VL);
                }
                float *oi = out + ((b * tq + i) * heads + h) * e;
                for (int c = 0; c < 128 / VL; c++)
                    if (c * VL < e) stv(oi + c * VL, o[c]);
                memcpy(p + ((b * heads + h) * tq + i) * tk, prow, tk * sizeof(float));
            }
        }
}

void benchbox_small_attention_backward_f32(const float *q, int64_t q_sb, int64_t q_st, const float *k,
                                           const float *v, int64_t kv_sb, int64_t kv_st, const int64_t *kv_len,
                                           const float *out, const float *p, const float *dout, float *dq, float *dk,
                                           float *dv, int64_t rows, int64_t tq, int64_t tk, int64_t heads, int64_t e,
                                           double scale) {
    float vt[128 * ATT_MAXT], ds[ATT_MAXT], pr[ATT_MAXT];
    const int64_t w = (tk + 15) & ~(int64_t)15;
    const float sc = (float)scale;
    memset(vt, 0, sizeof(float) * e * w);
    for (int64_t j = tk; j < w; j++) pr[j] = 0;
    for (int64_t b = 0; b < rows; b++)
        for (int64_t h = 0; h < heads; h++) {
            transpose_strided_f32(vt, w, v + b * kv_sb + h * e, kv_st, tk, e);
            for (int64_t j = 0; j < tk; j++)
                for (int64_t d = 0; d < e; d += VL) {
                    stv(dk + b * kv_sb + j * kv_st + h * e + d, (vf){0});
                    stv(dv + b * kv_sb + j * kv_st + h * e + d, (vf){0});
                }
            for (int64_t i = 0; i < tq; i++) {
                const float *qi = q + b * q_sb + i * q_st + h * e;
                const int64_t n = kv_len ? kv_len[b] : i + 1;
                const float *pi = p + ((b * heads + h) * tq + i) * tk;
                const float *gi = dout + ((b * tq + i) * heads + h) * e;
                const float di = dotv(gi, out + ((b * tq + i) * heads + h) * e, e);
                memcpy(pr, pi, tk * sizeof(float));
                for (int64_t c = 0; c * VL < n; c++)  /* ds = p (g . v - g . o) scale, 16 keys at a time */
                    stv(ds + c * VL, ldv(pr + c * VL) * (scoresv(gi, vt, e, w, c * VL) - di) * sc);
                vf acc[128 / VL] = {{0}};  /* dq_i in registers */
                for (int64_t j = 0; j < n; j++) {
                    const int64_t o = b * kv_sb + j * kv_st + h * e;
                    axpyv(dv + o, pr[j], gi, e);
                    axpyv(dk + o, ds[j], qi, e);
                    for (int c = 0; c < 128 / VL; c++)
                        if (c * VL < e) acc[c] += ds[j] * ldv(k + o + c * VL);
                }
                float *dqi = dq + b * q_sb + i * q_st + h * e;
                for (int c = 0; c < 128 / VL; c++)
                    if (c * VL < e) stv(dqi + c * VL, acc[c]);
            }
        }
}

/* RMSNorm's forward (model._RMSNormFunction) in one pass over rows of d: rstd = 1 / sqrt(mean(x^2) + eps),
   xhat = x rstd (kept for the backward) and y = xhat w, where torch makes six (pow, mean, add, rsqrt, two
   products). The row's sum of squares in VL lanes (float; d a multiple of 16) or in order (double). */
void benchbox_rmsnorm_forward_f32(const float *x, const float *w, float *xhat, float *rstd, float *y, int64_t rows,
                                  int64_t d, double eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        vf sq = {0};
        for (int64_t j = 0; j < d; j += VL) sq += ldv(xr + j) * ldv(xr + j);
        const float rs = 1.0f / sqrtf(hsumv(sq) / (float)d + (float)eps);
        rstd[r] = rs;
        for (int64_t j = 0; j < d; j += VL) {
            const vf xh = ldv(xr + j) * rs;
            stv(xhat + r * d + j, xh);
            stv(y + r * d + j, xh * ldv(w + j));
        }
    }
}

void benchbox_rmsnorm_forward_f64(const double *x, const double *w, double *xhat, double *rstd, double *y,
                                  int64_t rows, int64_t d, double eps) {
    for (int64_t r = 0; r < rows; r++) {
        const double *xr = x + r * d;
        double sq = 0;
        for (int64_t j = 0; j < d; j++) sq += xr[j] * xr[j];
        const double rs = 1.0 / sqrt(sq / (double)d + eps);
        rstd[r] = rs;
        for (int64_t j = 0; j < d; j++) {
            xhat[r * d + j] = xr[j] * rs;
            y[r * d + j] = xhat[r * d + j] * w[j];
        }
    }
}

/* TTT's inner loss gradient G = ln_l2_grad(z) (mixers.ttt._LNL2Grad, and inside _LinearChunks' dual form), rows of
   D: the inner layer norm's statistics (mean, rstd, xh), gxl = gam2 xh - gt and G = rstd (gxl - mean(gxl) - xh
   mean(gxl xh)); and its VJP (mixers.ttt._lnl2_vjp) from the upstream a: dz, dgt = -dgxl and dgam2 += xh dgxl.
   gam2 has one row for every `per` rows of z. The dual form inside one mini-batch (one chunk of one mini-batch, the
   study's window), per (b, h) block of S rows, around the GEMMs with the layer's weights (left to BLAS): forward
   G of Zk = K W + b and Zq -= P G; backward dP = -dZq G^T, dG = -P^T dZq and G's VJP. torch makes ~40 small
   operations of these. Rows' means in VL lanes (float; D a multiple of 16 up to 64) or in order (double). */
#define TTT_LNL2(T, SUF, MEAN, DOT, SQRT)                                                                \
static void lnl2_rows_##SUF(const T *zk, const T *gam2, const T *gt, T *xh, T *mean, T *rstd, T *gxl, T *g, \
                            int64_t rows, int64_t d, int64_t per, double eps) {                         \
    for (int64_t r = 0; r < rows; r++) {                                                                \
        const T *g2 = gam2 + (r / per) * d;                                                             \
        const int64_t o = r * d;                                                                        \
        const T m = MEAN(zk + o, d);                                                                    \
        for (int64_t j = 0; j < d; j++) xh[o + j] = zk[o + j] - m;                                      \
        const T rs = (T)1 / SQRT(DOT(xh + o, xh + o, d) + (T)eps);                                      \
        for (int64_t j = 0; j < d; j++) { xh[o + j] *= rs; gxl[o + j] = g2[j] * xh[o + j] - gt[o + j]; } \
        const T mg = MEAN(gxl + o, d), mgx = DOT(gxl + o, xh + o, d);                                   \
        for (int64_t j = 0; j < d; j++) g[o + j] = (gxl[o + j] - mg - xh[o + j] * mgx) * rs;            \
        mean[r] = m;                                                                                    \
        rstd[r] = rs;                                                                                   \
    }                                                                                                   \
}                                                                                                       \
static void lnl2_vjp_rows_##SUF(const T *a, const T *g, const T *xh, const T *rstd, const T *gxl,        \
                                const T *gam2, T *dzk, T *dgt, T *dgam2, T *dxh, int64_t rows, int64_t d, \
                                int64_t per) {                                                          \
    for (int64_t r = 0; r < rows; r++) {                                                                \
        const int64_t o = r * d;                                                                        \
        const T *g2 = gam2 + (r / per) * d;                                                             \
        T *dg2 = dgam2 + (r / per) * d;                                                                 \
        const T *ar = a + o, rs = rstd[r];                                                              \
        const T ma = MEAN(ar, d), max_ = DOT(ar, xh + o, d), m2 = DOT(gxl + o, xh + o, d);              \
        const T ag = DOT(ar, g + o, d) * rs, a2 = max_ * rs;                                            \
        T *dgx = dgt + o;  /* dgxl here, negated below */                                               \
        for (int64_t j = 0; j < d; j++) {                                                               \
            dgx[j] = rs * (ar[j] - ma - xh[o + j] * max_);                                              \
            dxh[j] = g2[j] * dgx[j] - ar[j] * rs * m2 - gxl[o + j] * a2;                                \
        }                                                                                               \
        const T mx = MEAN(dxh, d), mxx = DOT(dxh, xh + o, d);                                           \
        for (int64_t j = 0; j < d; j++) {                                                               \
            dzk[o + j] = rs * (dxh[j] - mx - xh[o + j] * mxx) - xh[o + j] * ag;                         \
            dg2[j] += xh[o + j] * dgx[j];                                                               \
            dgx[j] = -dgx[j];                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
void benchbox_lnl2_forward_##SUF(const T *zk, const T *gam2, const T *gt, T *xh, T *mean, T *rstd, T *gxl,  \
                                 T *g, int64_t rows, int64_t d, int64_t per, double eps) {              \
    lnl2_rows_##SUF(zk, gam2, gt, xh, mean, rstd, gxl, g, rows, d, per, eps);                           \
}                                                                                                       \
void benchbox_lnl2_vjp_##SUF(const T *a, const T *g, const T *xh, const T *rstd, const T *gxl, const T *gam2, \
                             T *dzk, T *dgt, T *dgam2, T *scratch, int64_t rows, int64_t d, int64_t per) { \
    for (int64_t i = 0; i < (rows / per) * d; i++) dgam2[i] = 0;                                        \
    lnl2_vjp_rows_##SUF(a, g, xh, rstd, gxl, gam2, dzk, dgt, dgam2, scratch, rows, d, per);             \
}                                                                                                       \
void benchbox_ttt_dual_forward_##SUF(const T *zk, const T *gam2, const T *gt, const T *p, T *zq, T *xh,   \
                                     T *mean, T *rstd, T *gxl, T *g, int64_t blocks, int64_t s_len,     \
                                     int64_t d, double eps) {                                           \
    lnl2_rows_##SUF(zk, gam2, gt, xh, mean, rstd, gxl, g, blocks * s_len, d, s_len, eps);               \
    for (int64_t bh = 0; bh < blocks; bh++)                                                             \
        for (int64_t t = 0; t < s_len; t++) {                                                           \
            T *zt = zq + (bh * s_len + t) * d;                                                          \
            const T *pt = p + (bh * s_len + t) * s_len;                                                 \
            for (int64_t s = 0; s < s_len; s++) {                                                       \
                const T w = pt[s];                                                                      \
                const T *gs = g + (bh * s_len + s) * d;                                                 \
                for (int64_t j = 0; j < d; j++) zt[j] -= w * gs[j];                                     \
            }                                                                                           \
        }                                                                                               \
}                                                                                                       \
void benchbox_ttt_dual_backward_##SUF(const T *dz, const T *p, const T *g, const T *xh, const T *rstd,    \
                                      const T *gxl, const T *gam2, T *dp, T *dzk, T *dgt, T *dgam2,       \
                                      T *scratch, int64_t blocks, int64_t s_len, int64_t d) {           \
    T *dg = scratch, *dxh = scratch + s_len * d;                                                        \
    for (int64_t i = 0; i < blocks * d; i++) dgam2[i] = 0;                                              \
    for (int64_t bh = 0; bh < blocks; bh++) {                                                           \
        const int64_t base = bh * s_len * d;                                                            \
        for (int64_t t = 0; t < s_len; t++)                                                             \
            for (int64_t s = 0; s < s_len; s++)                                                         \
                dp[(bh * s_len + t) * s_len + s] = -DOT(dz + base + t * d, g + base + s * d, d) * (T)d;  \
        for (int64_t i = 0; i < s_len * d; i++) dg[i] = 0;                                              \
        for (int64_t t = 0; t < s_len; t++)                                                             \
            for (int64_t s = 0; s < s_len; s++) {                                                       \
                const T w = p[(bh * s_len + t) * s_len + s];                                            \
                for (int64_t j = 0; j < d; j++) dg[s * d + j] -= w * dz[base + t * d + j];              \
            }                                                                                           \
        lnl2_vjp_rows_##SUF(dg, g + base, xh + base, rstd + bh * s_len, gxl + base, gam2 + bh * d,       \
                            dzk + base, dgt + base, dgam2 + bh * d, dxh, s_len, d, s_len);              \
    }                                                                                                   \
}

/* row means: DOT is mean(a b) over the row (d) */
static inline double mean_f64(const double *x, int64_t d) {
    double t = 0;
    for (int64_t j = 0; j < d; j++) t += x[j];
    return t / (double)d;
}
static inline double dot_f64(const double *a, const double *b, int64_t d) {
    double t = 0;
    for (int64_t j = 0; j < d; j++) t += a[j] * b[j];
    return t / (double)d;
}
static inline float mean_f32v(const float *x, int64_t d) {
    vf acc = ldv(x);
    for (int64_t j = VL; j < d; j += VL) acc += ldv(x + j);
    return hsumv(acc) / (float)d;
}
static inline float dot_f32v(const float *a, const float *b, int64_t d) {
    vf acc = ldv(a) * ldv(b);
    for (int64_t j = VL; j < d; j += VL) acc += ldv(a + j) * ldv(b + j);
    return hsumv(acc) / (float)d;
}
TTT_LNL2(double, f64, mean_f64, dot_f64, sqrt)
TTT_LNL2(float, f32, mean_f32v, dot_f32v, sqrtf)

/* Small row-major products for the window and TTT-MLP kernels: mm_T (C = [C] + alpha op(A) B, op(A) = A (M, K) or, with
   ta, A^T for A stored (K, M); B (K, N); C's rows in registers: float four (AVX-512) or six rows by two vectors at a
   time, so that eight or more independent sums of K FMAs hide the FMA latency (one row at a time is a chain of K
   dependent FMAs), N a multiple of 16) and mmdot_T (C = alpha A B^T, dots of K, a multiple of 16 in float; VL dots of
   a row at once, summed by hsum_lanes: 2x one at a time with its own hsumv). double: plain loops. And y += a x over a
   row. */
static inline void axpy_f64(double *restrict y, double a, const double *restrict x, int64_t n) {
    for (int64_t j = 0; j < n; j++) y[j] += a * x[j];
}
static inline void axpy_f32(float *y, float a, const float *x, int64_t n) {
    for (int64_t j = 0; j < n; j += VL) stv(y + j, ldv(y + j) + a * ldv(x + j));
}
static void mm_f64(double *c, const double *a, const double *b, int64_t M, int64_t K, int64_t N, int ta, double alpha,
                   int acc) {
    for (int64_t m = 0; m < M; m++) {
        double *cr = c + m * N;
        if (!acc) for (int64_t n = 0; n < N; n++) cr[n] = 0;
        for (int64_t k = 0; k < K; k++) {
            const double x = alpha * (ta ? a[k * M + m] : a[m * K + k]);
            for (int64_t n = 0; n < N; n++) cr[n] += x * b[k * N + n];
        }
    }
}
static void mmdot_f64(double *c, const double *a, const double *b, int64_t M, int64_t N, int64_t K, double alpha) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++) s += a[m * K + k] * b[n * K + k];
            c[m * N + n] = alpha * s;
        }
}
/* mm_f32's blocks: rows m0 .. m0 + R - 1 by two vectors (MM_BLOCK2) or one (MM_BLOCK1) of columns from n0, R x 2 or
   R accumulators over k in order */
#define MM_BLOCK2(R)                                                                                     \
    do {                                                                                                 \
        vf s[R][2] = {{{0}}};                                                                            \
        for (int64_t k = 0; k < K; k++) {                                                                \
            const vf b0 = ldv(b + k * N + n0), b1 = ldv(b + k * N + n0 + VL);                            \
            for (int q = 0; q < R; q++) {                                                                \
                const float x = a[(m0 + q) * sm + k * sk];                                               \
                s[q][0] += x * b0;                                                                       \
                s[q][1] += x * b1;                                                                       \
            }                                                                                            \
        }                                                                                                \
        for (int q = 0; q < R; q++)                                                                      \
            for (int h = 0; h < 2; h++) {                                                                \
                float *cp = c + (m0 + q) * N + n0 + VL * h;                                              \
                stv(cp, (acc ? ldv(cp) : (vf){0}) + alpha * s[q][h]);                                    \
            }                                                                                            \
    } while (0)
#define MM_BLOCK1(R)                                                                                     \
    do {                                                                                                 \
        vf s[R] = {{0}};                                                                                 \
        for (int64_t k = 0; k < K; k++) {                                                                \
            const vf b0 = ldv(b + k * N + n0);                                                           \
            for (int q = 0; q < R; q++) s[q] += a[(m0 + q) * sm + k * sk] * b0;                          \
        }                                                                                                \
        for (int q = 0; q < R; q++) {                                                                    \
            float *cp = c + (m0 + q) * N + n0;                                                           \
            stv(cp, (acc ? ldv(cp) : (vf){0}) + alpha * s[q]);                                           \
        }                                                                                                \
    } while (0)
static void mm_f32(float *c, const float *a, const float *b, int64_t M, int64_t K, int64_t N, int ta, double alpha_d,
                   int acc) {
    const float alpha = (float)alpha_d;
    const int64_t sm = ta ? 1 : K, sk = ta ? M : 1;  /* op(A)[m][k] = a[m sm + k sk] */
    int64_t m0 = 0, n0;
#if VL == 16
    /* 4 rows x 2 vectors of accumulators, rows outer */
    for (; m0 + 4 <= M; m0 += 4) {
        for (n0 = 0; n0 + 2 * VL <= N; n0 += 2 * VL) MM_BLOCK2(4);
        for (; n0 < N; n0 += VL) MM_BLOCK1(4);
    }
    for (; m0 < M; m0++)
        for (n0 = 0; n0 < N; n0 += VL) MM_BLOCK1(1);
#else
    /* 16 ymm registers: 6 rows x 2 vectors (4 x 2 left the FMA ports waiting on loads), column panels outer so that
       a panel of B (K x 2 VL) stays in L1 across the row blocks (a B of 64 x 256 does not fit). The rows left over
       take one block of as many rows by two vectors (M = 16: 6 + 6 + 4; 6 k + 2 as 6 (k - 1) + 4 + 4): by one vector
       at a time, 4 rows kept 4 sums in flight where the FMA ports need 8, and a row on its own is a single chain
       (1.3-1.5x on the TTT-MLP chunk's shapes, measured). */
    const int64_t m6 = M >= 8 && M % 6 == 2 ? M - 8 : M / 6 * 6;
    for (n0 = 0; n0 + 2 * VL <= N; n0 += 2 * VL) {
        for (m0 = 0; m0 < m6; m0 += 6) MM_BLOCK2(6);
        switch (M - m6) {
            case 8: MM_BLOCK2(4); m0 += 4; MM_BLOCK2(4); break;
            case 5: MM_BLOCK2(5); break;
            case 4: MM_BLOCK2(4); break;
            case 3: MM_BLOCK2(3); break;
            case 2: MM_BLOCK2(2); break;
            case 1: MM_BLOCK2(1); break;
        }
    }
    for (; n0 < N; n0 += VL) {
        for (m0 = 0; m0 < m6; m0 += 6) MM_BLOCK1(6);
        for (; m0 + 4 <= M; m0 += 4) MM_BLOCK1(4);
        for (; m0 < M; m0++) MM_BLOCK1(1);
    }
#endif
}
static void mmdot_f32(float *c, const float *a, const float *b, int64_t M, int64_t N, int64_t K, double alpha) {
    const vi order = V_BITREV;
    for (int64_t m = 0; m < M; m++) {
        const float *ar = a + m * K;
        int64_t n0 = 0;
        for (; n0 + VL <= N; n0 += VL) {  /* VL dots of row m at once, summed by hsum_lanes */
            vf s[VL];
            const vf a0 = ldv(ar);
            for (int j = 0; j < VL; j++) s[j] = a0 * ldv(b + (n0 + order[j]) * K);
            for (int64_t k = VL; k < K; k += VL) {
                const vf ak = ldv(ar + k);
                for (int j = 0; j < VL; j++) s[j] += ak * ldv(b + (n0 + order[j]) * K + k);
            }
            stv(c + m * N + n0, (float)alpha * hsum_lanes(s));
        }
        for (int64_t n = n0; n < N; n++) {
            vf s = ldv(a + m * K) * ldv(b + n * K);
            for (int64_t k = VL; k < K; k += VL) s += ldv(a + m * K + k) * ldv(b + n * K + k);
            c[m * N + n] = (float)alpha * hsumv(s);
        }
    }
}
/* RoPE on one row of interleaved pairs (x_2i, x_2i+1) with the row's (cos, sin) pairs csr: (x0 c - x1 s, x0 s + x1 c),
   or its transpose (inverse: the backward). float: VL lanes (VL / 2 pairs) with in-register pair swaps. */
static inline void rope_row_f64(double *out, const double *x, const double *csr, int64_t d, int inverse) {
    for (int64_t i = 0; i < d / 2; i++) {
        const double c = csr[2 * i], sn = inverse ? -csr[2 * i + 1] : csr[2 * i + 1];
        const double x0 = x[2 * i], x1 = x[2 * i + 1];
        out[2 * i] = x0 * c - x1 * sn;
        out[2 * i + 1] = x0 * sn + x1 * c;
    }
}
static inline void rope_row_f32(float *out, const float *x, const float *csr, int64_t d, int inverse) {
    const vi evens = V_EVENS, odds = V_ODDS, swap = V_SWAP;
    const vf sign = (vf)V_ALT * (inverse ? -1.0f : 1.0f);
    for (int64_t j = 0; j < d; j += VL) {
        const vf cs = ldv(csr + j), xv = ldv(x + j);
        const vf c = __builtin_shuffle(cs, evens), sn = __builtin_shuffle(cs, odds) * sign;
        stv(out + j, xv * c + __builtin_shuffle(xv, swap) * sn);
    }
}

/* TTT-Linear over L positions scanned in chunks of SC (mini-batches of K, a chunk holds one or several, the last chunk
   may be shorter), the whole layer between its projection and its post-norm (mixers.ttt._LinearWindow), per (b, h)
   block, with no tensor in between; the inner weights (Wc, bc) start as the layer's and after each chunk take its
   step W -= K^T (e G), b -= sum e G (e = tok_{K-1} eta), and `save` keeps them at every chunk's start. Per chunk: q, k, v and the learning-rate logit read from the projection's rows
   (q | k | v | logit, row stride ps), RoPE on interleaved pairs (cs: (S, D/2) cos, sin pairs, or NULL), eta =
   sigmoid(logit + lrb) eta_scale, Zk = K W + b, G = the inner loss gradient (lnl2_rows) row by row, a row's Zk first
   less the earlier mini-batches' steps M[t][s] G_s (M = (k_t.k_s + 1) tok_{K-1} eta_s), P[t][s] = (q_t.k_s + 1)
   tok eta_s for s <= t (tok of t's place in its mini-batch, or tok_{K-1} for an earlier mini-batch), Zq = Q W + b -
   P G and out = q + LN(Zq) gamma + beta, written as (B, L, H D). `save` keeps per block what the backward reads
   (rotated q and k, G and its statistics, the output LN's, v - k - beta, sigmoid, P and the weights per chunk). The
   backward runs the chunks in reverse with the gradient of the weights after each chunk (dWn, dbn), writes
   d(projection) in the projection's layout and accumulates this part's parameter gradients (dW (H, D, D), db, dgam,
   dbet (H, D), dtok (K), dlrb (H)). */
#define TTT_WINDOW_CHUNKS(L, SC) (((L) + (SC) - 1) / (SC))
#define TTT_WINDOW_SAVE(L, SC, D) (7 * (L) * (D) + 3 * (L) + TTT_WINDOW_CHUNKS(L, SC) * ((SC) * (SC) + (D) * (D) + (D)))
#define TTT_WINDOW(T, SUF, MEAN, DOT, SQRT, EXP, AXPY, MM, ROPE)                                          \
static void ttt_window_forward_range_##SUF(const T *proj, int64_t ps, const T *lrb, const T *tok, const T *W, \
        const T *b1, const T *gam, const T *bet, const T *cs, double eta_scale, T *out, T *save,          \
        int64_t b0, int64_t b1n, int64_t L, int64_t H, int64_t D, int64_t K, int64_t SC, double eps) {  \
    const int64_t C = H * D, SV = TTT_WINDOW_SAVE(L, SC, D), nc = TTT_WINDOW_CHUNKS(L, SC);            \
    T g2[64], zk[64 * 64], zq[64 * 64], gt[64 * 64], mean[64], Wc[64 * 64], bc[64], eg[64 * 64];       \
    for (int64_t b = b0; b < b1n; b++)                                                                  \
        for (int64_t h = 0; h < H; h++) {                                                               \
            T *qr = save + (b * H + h) * SV, *kr = qr + L * D, *G = kr + L * D, *xh = G + L * D;        \
            T *gxl = xh + L * D, *xq = gxl + L * D, *vmk = xq + L * D, *rstd = vmk + L * D;             \
            T *rstdq = rstd + L, *sg = rstdq + L, *Ps = sg + L, *Ws = Ps + nc * SC * SC, *bs = Ws + nc * D * D; \
            const T *gh = gam + h * D, *beh = bet + h * D;                                              \
            for (int64_t j = 0; j < D; j++) g2[j] = gh[j] * gh[j];                                      \
            memcpy(Wc, W + h * D * D, D * D * sizeof(T));                                               \
            memcpy(bc, b1 + h * D, D * sizeof(T));                                                      \
            for (int64_t c = 0; c < nc; c++) {  /* chunk c: rows t0 .. t0 + r - 1, the state (Wc, bc) at its start */ \
                const int64_t t0 = c * SC, r = L - t0 < SC ? L - t0 : SC;                               \
                T *P = Ps + c * SC * SC;                                                                \
                memcpy(Ws + c * D * D, Wc, D * D * sizeof(T));                                          \
                memcpy(bs + c * D, bc, D * sizeof(T));                                                  \
                for (int64_t t = 0; t < r; t++) {                                                       \
                    const int64_t tg = t0 + t;                                                          \
                    const T *row = proj + (b * L + tg) * ps;                                            \
                    const T *q = row + h * D, *k = row + C + h * D, *v = row + 2 * C + h * D;           \
                    T *qt = qr + tg * D, *kt = kr + tg * D;                                             \
                    sg[tg] = (T)1 / ((T)1 + EXP(-(row[3 * C + h] + lrb[h])));                           \
                    if (cs) {                                                                           \
                        ROPE(qt, q, cs + tg * D, D, 0);                                                 \
                        ROPE(kt, k, cs + tg * D, D, 0);                                                 \
                    } else {                                                                            \
                        for (int64_t j = 0; j < D; j++) { qt[j] = q[j]; kt[j] = k[j]; }                 \
                    }                                                                                   \
                    for (int64_t j = 0; j < D; j++) {                                                   \
                        vmk[tg * D + j] = v[j] - kt[j] - beh[j];                                        \
                        gt[t * D + j] = gh[j] * vmk[tg * D + j];                                        \
                        zk[t * D + j] = bc[j];                                                          \
                        zq[t * D + j] = bc[j];                                                          \
                    }                                                                                   \
                }                                                                                       \
                const T *qc = qr + t0 * D, *kc = kr + t0 * D;                                           \
                T *Gc = G + t0 * D;                                                                     \
                MM(zk, kc, Wc, r, D, D, 0, 1, 1);                                                       \
                MM(zq, qc, Wc, r, D, D, 0, 1, 1);                                                       \
                for (int64_t t = 0; t < r; t++) {  /* G row by row: a row sees the earlier mini-batches' steps */ \
                    for (int64_t s = 0; s < t / K * K; s++) {                                           \
                        const T m = (DOT(kc + t * D, kc + s * D, D) * (T)D + 1) * tok[K - 1] * sg[t0 + s] * (T)eta_scale; \
                        AXPY(zk + t * D, -m, Gc + s * D, D);                                            \
                    }                                                                                   \
                    lnl2_rows_##SUF(zk + t * D, g2, gt + t * D, xh + (t0 + t) * D, mean + t, rstd + t0 + t, \
                                    gxl + (t0 + t) * D, Gc + t * D, 1, D, 1, eps);                      \
                }                                                                                       \
                for (int64_t t = 0; t < r; t++) {                                                       \
                    T *zqt = zq + t * D, *o = out + (b * L + t0 + t) * C + h * D;                       \
                    for (int64_t s = 0; s < r; s++) {                                                   \
                        if (s > t) { P[t * SC + s] = 0; continue; }                                     \
                        const T tk = s / K == t / K ? tok[t % K] : tok[K - 1];                          \
                        const T p = (DOT(qc + t * D, kc + s * D, D) * (T)D + 1) * tk * sg[t0 + s] * (T)eta_scale; \
                        P[t * SC + s] = p;                                                              \
                        AXPY(zqt, -p, Gc + s * D, D);                                                   \
                    }                                                                                   \
                    const T m = MEAN(zqt, D);                                                           \
                    T *xqt = xq + (t0 + t) * D;                                                         \
                    for (int64_t j = 0; j < D; j++) xqt[j] = zqt[j] - m;                                \
                    const T rs = (T)1 / SQRT(DOT(xqt, xqt, D) + (T)eps);                                \
                    rstdq[t0 + t] = rs;                                                                 \
                    for (int64_t j = 0; j < D; j++) {                                                   \
                        xqt[j] *= rs;                                                                   \
                        o[j] = qc[t * D + j] + gh[j] * xqt[j] + beh[j];                                 \
                    }                                                                                   \
                }                                                                                       \
                if (c < nc - 1) {  /* the state after the chunk: W -= K^T (e G), b -= sum e G, e = tok_last eta */ \
                    for (int64_t s = 0; s < r; s++) {                                                   \
                        const T e = tok[K - 1] * sg[t0 + s] * (T)eta_scale;                             \
                        for (int64_t j = 0; j < D; j++) eg[s * D + j] = e * Gc[s * D + j];              \
                        AXPY(bc, -1, eg + s * D, D);                                                    \
                    }                                                                                   \
                    MM(Wc, kc, eg, D, r, D, 1, -1, 1);                                                  \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
}                                                                                                       \
static void ttt_window_backward_range_##SUF(const T *proj, int64_t ps, const T *tok,                    \
        const T *gam, const T *cs, double eta_scale, const T *save, const T *dout, T *dproj, T *dW, T *db,  \
        T *dgam, T *dbet, T *dtok, T *dlrb, int64_t b0, int64_t b1n, int64_t L, int64_t H, int64_t D,     \
        int64_t K, int64_t SC) {                                                                        \
    const int64_t C = H * D, SV = TTT_WINDOW_SAVE(L, SC, D), nc = TTT_WINDOW_CHUNKS(L, SC);            \
    T g2[64], dg2[64], dxh[64], dq[64 * 64], dk[64 * 64], dz[64 * 64], dG[64 * 64], dzk[64 * 64];       \
    T dgt[64 * 64], deta[64], WT[64 * 64], dWn[64 * 64], dbn[64], tmp[64 * 64];                         \
    for (int64_t b = b0; b < b1n; b++)                                                                  \
        for (int64_t h = 0; h < H; h++) {                                                               \
            const T *qr = save + (b * H + h) * SV, *kr = qr + L * D, *G = kr + L * D, *xh = G + L * D;  \
            const T *gxl = xh + L * D, *xq = gxl + L * D, *vmk = xq + L * D, *rstd = vmk + L * D;       \
            const T *rstdq = rstd + L, *sg = rstdq + L, *Ps = sg + L, *Ws = Ps + nc * SC * SC;          \
            const T *gh = gam + h * D;                                                                  \
            T *dgh = dgam + h * D, *dbeh = dbet + h * D;                                                \
            for (int64_t j = 0; j < D; j++) { g2[j] = gh[j] * gh[j]; dg2[j] = 0; dbn[j] = 0; }          \
            memset(dWn, 0, D * D * sizeof(T));                                                          \
            for (int64_t c = nc - 1; c >= 0; c--) {  /* dWn, dbn: the gradient of the state after chunk c */ \
                const int64_t t0 = c * SC, r = L - t0 < SC ? L - t0 : SC;                               \
                const T *P = Ps + c * SC * SC, *Wc = Ws + c * D * D, *qc = qr + t0 * D, *kc = kr + t0 * D; \
                const T *Gc = G + t0 * D, *sgc = sg + t0;                                               \
                transpose_##SUF(WT, Wc, D, D);                                                          \
                memset(dG, 0, r * D * sizeof(T));                                                       \
                memset(dk, 0, r * D * sizeof(T));                                                       \
                for (int64_t t = 0; t < r; t++) deta[t] = 0;                                            \
                if (c < nc - 1) {  /* the state update after the chunk, W' = W - K^T (e G), b' = b - sum e G */ \
                    T *deg = tmp;                                                                       \
                    for (int64_t s = 0; s < r; s++)                                                     \
                        for (int64_t j = 0; j < D; j++) deg[s * D + j] = -dbn[j];                       \
                    MM(deg, kc, dWn, r, D, D, 0, -1, 1);  /* d(e G) = -(K dW' + db') */                  \
                    T *eg = dz, *dWnT = dzk;  /* scratch until those are written below */               \
                    transpose_##SUF(dWnT, dWn, D, D);                                                   \
                    for (int64_t s = 0; s < r; s++) {                                                   \
                        const T es = tok[K - 1] * sgc[s] * (T)eta_scale;                                \
                        const T de = DOT(Gc + s * D, deg + s * D, D) * (T)D;                            \
                        deta[s] += de * tok[K - 1];                                                     \
                        dtok[K - 1] += de * sgc[s] * (T)eta_scale;                                      \
                        for (int64_t j = 0; j < D; j++) {                                               \
                            dG[s * D + j] += es * deg[s * D + j];                                       \
                            eg[s * D + j] = es * Gc[s * D + j];                                         \
                        }                                                                               \
                    }                                                                                   \
                    MM(dk, eg, dWnT, r, D, D, 0, -1, 1);  /* dK = -(e G) dW'^T */                        \
                }                                                                                       \
                for (int64_t t = 0; t < r; t++) {                                                       \
                    const T *a = dout + (b * L + t0 + t) * C + h * D, *xqt = xq + (t0 + t) * D;         \
                    T *dzt = dz + t * D, *dqt = dq + t * D;                                             \
                    for (int64_t j = 0; j < D; j++) {                                                   \
                        dqt[j] = a[j];                                                                  \
                        dgh[j] += a[j] * xqt[j];                                                        \
                        dbeh[j] += a[j];                                                                \
                        dzt[j] = a[j] * gh[j];  /* d(xq), made d(Zq) below */                           \
                    }                                                                                   \
                    const T m1 = MEAN(dzt, D), m2 = DOT(dzt, xqt, D), rs = rstdq[t0 + t];               \
                    for (int64_t j = 0; j < D; j++) dzt[j] = rs * (dzt[j] - m1 - xqt[j] * m2);          \
                    AXPY(dbn, 1, dzt, D);                                                               \
                }                                                                                       \
                MM(dq, dz, WT, r, D, D, 0, 1, 1);  /* Zq = Q W + b - P G */                             \
                MM(dWn, qc, dz, D, r, D, 1, 1, 1);                                                      \
                for (int64_t t = 0; t < r; t++) {                                                       \
                    const T *dzt = dz + t * D;                                                          \
                    for (int64_t s = 0; s <= t; s++) {                                                  \
                        const T p = P[t * SC + s], dp = -DOT(dzt, Gc + s * D, D) * (T)D;                \
                        AXPY(dG + s * D, -p, dzt, D);                                                   \
                        const T a1 = DOT(qc + t * D, kc + s * D, D) * (T)D + 1, es = sgc[s] * (T)eta_scale; \
                        const int64_t ti = s / K == t / K ? t % K : K - 1;                              \
                        const T da = dp * tok[ti] * es;                                                 \
                        dtok[ti] += dp * a1 * es;                                                       \
                        deta[s] += dp * a1 * tok[ti];                                                   \
                        AXPY(dq + t * D, da, kc + s * D, D);                                            \
                        AXPY(dk + s * D, da, qc + t * D, D);                                            \
                    }                                                                                   \
                }                                                                                       \
                for (int64_t t = r - 1; t >= 0; t--) {  /* G's rows in reverse: a row's z read earlier G's */ \
                    lnl2_vjp_rows_##SUF(dG + t * D, Gc + t * D, xh + (t0 + t) * D, rstd + t0 + t,           \
                                        gxl + (t0 + t) * D, g2, dzk + t * D, dgt + t * D, dg2, dxh, 1, D, 1); \
                    for (int64_t s = 0; s < t / K * K; s++) {  /* z_t -= M[t][s] G_s */                 \
                        const T es = sgc[s] * (T)eta_scale, tl = tok[K - 1];                            \
                        const T kk1 = DOT(kc + t * D, kc + s * D, D) * (T)D + 1;                        \
                        const T dm = -DOT(dzk + t * D, Gc + s * D, D) * (T)D, dkk = dm * tl * es;       \
                        AXPY(dG + s * D, -kk1 * tl * es, dzk + t * D, D);                               \
                        AXPY(dk + t * D, dkk, kc + s * D, D);                                           \
                        AXPY(dk + s * D, dkk, kc + t * D, D);                                           \
                        dtok[K - 1] += dm * kk1 * es;                                                   \
                        deta[s] += dm * kk1 * tl;                                                       \
                    }                                                                                   \
                }                                                                                       \
                for (int64_t t = 0; t < r; t++) {                                                       \
                    T *dkt = dk + t * D, *dv = dproj + (b * L + t0 + t) * ps + 2 * C + h * D;           \
                    for (int64_t j = 0; j < D; j++) {  /* gt = gamma (v - k - beta) */                  \
                        const T dvm = gh[j] * dgt[t * D + j];                                           \
                        dv[j] = dvm;                                                                    \
                        dkt[j] -= dvm;                                                                  \
                        dbeh[j] -= dvm;                                                                 \
                        dgh[j] += vmk[(t0 + t) * D + j] * dgt[t * D + j];                               \
                    }                                                                                   \
                    AXPY(dbn, 1, dzk + t * D, D);                                                       \
                }                                                                                       \
                MM(dk, dzk, WT, r, D, D, 0, 1, 1);  /* Zk = K W + b */                                  \
                MM(dWn, kc, dzk, D, r, D, 1, 1, 1);                                                     \
                for (int64_t t = 0; t < r; t++) {                                                       \
                    const int64_t tg = t0 + t;                                                          \
                    T *row = dproj + (b * L + tg) * ps;                                                 \
                    const T *dqt = dq + t * D, *dkt = dk + t * D;                                       \
                    T *dqo = row + h * D, *dko = row + C + h * D;                                       \
                    if (cs) {  /* RoPE's transpose */                                                   \
                        ROPE(dqo, dqt, cs + tg * D, D, 1);                                              \
                        ROPE(dko, dkt, cs + tg * D, D, 1);                                              \
                    } else {                                                                            \
                        for (int64_t j = 0; j < D; j++) { dqo[j] = dqt[j]; dko[j] = dkt[j]; }           \
                    }                                                                                   \
                    const T dl = deta[t] * (T)eta_scale * sg[tg] * (1 - sg[tg]);                        \
                    row[3 * C + h] = dl;                                                                \
                    dlrb[h] += dl;                                                                      \
                }                                                                                       \
            }                                                                                           \
            for (int64_t j = 0; j < D; j++) dgh[j] += 2 * gh[j] * dg2[j];                               \
            AXPY(dW + h * D * D, 1, dWn, D * D);  /* the state at the start: the layer's own W and b */ \
            AXPY(db + h * D, 1, dbn, D);                                                                \
        }                                                                                               \
}
TTT_WINDOW(double, f64, mean_f64, dot_f64, sqrt, exp, axpy_f64, mm_f64, rope_row_f64)
TTT_WINDOW(float, f32, mean_f32v, dot_f32v, sqrtf, expf, axpy_f32, mm_f32, rope_row_f32)

#define SP_BLOCK 64
void benchbox_sigmoid_project_backward_f32(const float *ga, const float *s, const float *w, float *gu, float *gw,
                                           float *part, int64_t n, int64_t hd, int64_t k) {
    for (int64_t i = 0; i < k * hd; i++) gw[i] = 0;
    for (int64_t i0 = 0; i0 < n; i0 += SP_BLOCK) {
        const int64_t i1 = i0 + SP_BLOCK < n ? i0 + SP_BLOCK : n;
        for (int64_t i = 0; i < k * hd; i++) part[i] = 0;
        for (int64_t i = i0; i < i1; i++) {
            const float *sr = s + i * hd, *g = ga + i * k;
            float *gr = gu + i * hd;
            for (int64_t j = 0; j < hd; j += VL) {
                vf sv = ldv(sr + j), gv = {0};
                if (k == 4) {
                    gv = g[0] * ldv(w + j) + g[1] * ldv(w + hd + j) + g[2] * ldv(w + 2 * hd + j)
                         + g[3] * ldv(w + 3 * hd + j);
                    stv(part + j, ldv(part + j) + g[0] * sv);
                    stv(part + hd + j, ldv(part + hd + j) + g[1] * sv);
                    stv(part + 2 * hd + j, ldv(part + 2 * hd + j) + g[2] * sv);
                    stv(part + 3 * hd + j, ldv(part + 3 * hd + j) + g[3] * sv);
                } else {
                    for (int64_t q = 0; q < k; q++) {
                        gv += g[q] * ldv(w + q * hd + j);
                        stv(part + q * hd + j, ldv(part + q * hd + j) + g[q] * sv);
                    }
                }
                stv(gr + j, gv * ((1.0f - sv) * sv));
            }
        }
        for (int64_t i = 0; i < k * hd; i++) gw[i] += part[i];
    }
}

void benchbox_sigmoid_project_backward_f64(const double *ga, const double *s, const double *w, double *gu,
                                           double *gw, double *part, int64_t n, int64_t hd, int64_t k) {
    for (int64_t i = 0; i < k * hd; i++) gw[i] = 0;
    for (int64_t i0 = 0; i0 < n; i0 += SP_BLOCK) {
        const int64_t i1 = i0 + SP_BLOCK < n ? i0 + SP_BLOCK : n;
        for (int64_t i = 0; i < k * hd; i++) part[i] = 0;
        for (int64_t i = i0; i < i1; i++)
            for (int64_t j = 0; j < hd; j++) {
                const double sv = s[i * hd + j];
                double gv = 0;
                for (int64_t q = 0; q < k; q++) {
                    gv += ga[i * k + q] * w[q * hd + j];
                    part[q * hd + j] += ga[i * k + q] * sv;
                }
                gu[i * hd + j] = gv * ((1.0 - sv) * sv);
            }
        for (int64_t i = 0; i < k * hd; i++) gw[i] += part[i];
    }
}

/* erf-GELU (model.GELU): y = x Phi(x) and, where a gradient is wanted, d = Phi(x) + x phi(x), its derivative, kept for
   the backward (g d, one product), Phi and phi the normal CDF and density. torch's CPU GELU took 1.2-1.6 ns an element
   forward and 1.9-2.8 backward on a Zen 3 (AVX2; a study-protocol SASRec step's three GELUs 1.3 ms of 16). Phi from
   erf(z) ~ z P(z^2) / Q(z^2), |z| clamped to 3.92 (erf rounds to 1 there), a rational fit of our own
   (benchmarks/erf_fit.py: 1.6e-8 in double, 3.2e-7 evaluated in float32, about torch's float32 GELU's own error; like
   torch's, the far negative tail is 0 where x Phi(x) < ~1e-7 |x|); phi by expv_n. float: GELU_N vectors in lockstep,
   each step a loop over them (unrolled, so their instructions interleave; one vector's chain of a divide and two
   polynomials, written one vector after another, ran at about one vector at a time), the last partial block through a
   padded copy; double: the C library's erfc and exp. The vectors cut into `parts` ranges on torch's threads. */
#define GELU_N EXPV_MAX
#define GELU_EACH for (int j = 0; j < GELU_N; j++)
#define GELU_ZMAX 3.92f
#define GELU_RSQRT2 0.70710678118654752440
#define GELU_RSQRT2PI 0.39894228040143267794
static const float gelu_erf_p[6] = {1.12837899f, 0.192761198f, 0.0530601032f, 0.00386820268f, 0.000287476258f,
                                    2.03475361e-06f};
static const float gelu_erf_q[6] = {1.0f, 0.504161835f, 0.115083434f, 0.0151720494f, 0.00118808413f,
                                    3.80706661e-05f};
/* GELU_N vectors from x into y and (d not NULL) the derivative into d */
static inline void gelu_n(const float *x, float *y, float *d) {
    vf xv[GELU_N], z[GELU_N], u[GELU_N], p[GELU_N], q[GELU_N], c[GELU_N];
    GELU_EACH xv[j] = ldv(x + j * VL);
    GELU_EACH z[j] = clampv(xv[j] * (float)GELU_RSQRT2, -GELU_ZMAX, GELU_ZMAX);
    GELU_EACH u[j] = z[j] * z[j];
    GELU_EACH p[j] = u[j] * gelu_erf_p[5] + gelu_erf_p[4];
    GELU_EACH q[j] = u[j] * gelu_erf_q[5] + gelu_erf_q[4];
    for (int k = 3; k >= 0; k--) {
        GELU_EACH p[j] = p[j] * u[j] + gelu_erf_p[k];
        GELU_EACH q[j] = q[j] * u[j] + gelu_erf_q[k];
    }
    GELU_EACH c[j] = 0.5f + 0.5f * (z[j] * p[j] / q[j]);  /* Phi(x) */
    GELU_EACH stv(y + j * VL, xv[j] * c[j]);
    if (!d) return;
    GELU_EACH z[j] = clampv(xv[j], -16.0f, 16.0f);  /* x phi(x) < 1e-37 past 16: no inf * 0 at huge or infinite x */
    GELU_EACH u[j] = -0.5f * z[j] * z[j];
    expv_n(u, GELU_N);
    GELU_EACH stv(d + j * VL, c[j] + z[j] * u[j] * (float)GELU_RSQRT2PI);
}
void benchbox_gelu_f32(const float *x, float *y, float *d, int64_t n, int64_t parts) {
    const int64_t step = GELU_N * VL, blocks = n / step;
    _Pragma("omp parallel for num_threads(parts) schedule(static)")
    for (int64_t p_ = 0; p_ < parts; p_++)
        for (int64_t b = blocks * p_ / parts; b < blocks * (p_ + 1) / parts; b++)
            gelu_n(x + b * step, y + b * step, d ? d + b * step : NULL);
    const int64_t rest = n - blocks * step;
    if (rest) {
        float xb[GELU_N * VL] = {0}, yb[GELU_N * VL], db[GELU_N * VL];
        memcpy(xb, x + n - rest, rest * sizeof(float));
        gelu_n(xb, yb, d ? db : NULL);
        memcpy(y + n - rest, yb, rest * sizeof(float));
        if (d) memcpy(d + n - rest, db, rest * sizeof(float));
    }
}
void benchbox_gelu_f64(const double *x, double *y, double *d, int64_t n, int64_t parts) {
    (void)parts;
    for (int64_t i = 0; i < n; i++) {
        const double c = 0.5 * erfc(-x[i] * GELU_RSQRT2);
        y[i] = x[i] * c;
        if (d) d[i] = c + x[i] * exp(-0.5 * x[i] * x[i]) * GELU_RSQRT2PI;
    }
}

/* ComiRec-SA's interests and scores at a row's end (readouts.ComiRecSAReadout.scores): per row b, att = softmax over
   the valid positions s < len_b of the logits a (S, K), the interests v = att^T h (K, D), and each candidate's score,
   its best interest, out_c = max_k cand_c . v_k. torch makes these five small batched products (and the backward's
   five) at ~1 us a matrix of per-matrix cost: 204 rows x (10 positions, 4 interests, 64 channels, 5 candidates) took
   ~0.9 ms of a 9.4 ms study step on a Zen 3. Here one pass over the rows each way, everything of a row in L1. att, v
   and the (C, K) scores are kept for the backward. Ties of the max share the gradient equally, as amax's backward.
   Rows with len_b < 1 are the caller's to avoid (torch gives NaN there). */
#define POOL_SCORE(T, SUF, EXP)                                                                         \
void benchbox_pool_score_##SUF(const T *a, const T *h, const T *cand, const int64_t *len, T *att, T *v, T *sc,  \
                               T *out, int64_t B, int64_t S, int64_t K, int64_t D, int64_t C) {       \
    for (int64_t b = 0; b < B; b++) {                                                                   \
        const T *ab = a + b * S * K, *hb = h + b * S * D, *cb = cand + b * C * D;                        \
        T *tb = att + b * S * K, *vb = v + b * K * D, *sb = sc + b * C * K;                              \
        const int64_t n = len[b] < S ? len[b] : S;                                                      \
        for (int64_t k = 0; k < K; k++) {                                                               \
            T m = ab[k], den = 0;                                                                       \
            for (int64_t s = 1; s < n; s++) m = ab[s * K + k] > m ? ab[s * K + k] : m;                   \
            for (int64_t s = 0; s < S; s++) {                                                           \
                const T e = s < n ? EXP(ab[s * K + k] - m) : 0;                                         \
                tb[s * K + k] = e;                                                                      \
                den += e;                                                                               \
            }                                                                                           \
            for (int64_t s = 0; s < S; s++) tb[s * K + k] /= den;                                       \
        }                                                                                               \
        for (int64_t k = 0; k < K; k++) {                                                               \
            T *vk = vb + k * D;                                                                         \
            for (int64_t d = 0; d < D; d++) vk[d] = 0;                                                  \
            for (int64_t s = 0; s < n; s++) {                                                           \
                const T w = tb[s * K + k];                                                              \
                const T *hs = hb + s * D;                                                               \
                for (int64_t d = 0; d < D; d++) vk[d] += w * hs[d];                                     \
            }                                                                                           \
        }                                                                                               \
        for (int64_t c = 0; c < C; c++) {                                                               \
            T best = 0;                                                                                 \
            for (int64_t k = 0; k < K; k++) {                                                           \
                T dot = 0;                                                                              \
                _Pragma("omp simd reduction(+:dot)")  /* in lanes: evaluation scores 100 candidates a row */ \
                for (int64_t d = 0; d < D; d++) dot += cb[c * D + d] * vb[k * D + d];                   \
                sb[c * K + k] = dot;                                                                    \
                best = k == 0 || dot > best ? dot : best;                                               \
            }                                                                                           \
            out[b * C + c] = best;                                                                      \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
void benchbox_pool_score_backward_##SUF(const T *g, const T *h, const T *cand, const int64_t *len,      \
        const T *att, const T *v, const T *sc, const T *out, T *da, T *dh, T *dcand, T *work, int64_t B, \
        int64_t S, int64_t K, int64_t D, int64_t C) {                                                   \
    T *dv = work, *datt = work + K * D;  /* (K, D), (S, K) */                                           \
    for (int64_t b = 0; b < B; b++) {                                                                   \
        const T *hb = h + b * S * D, *cb = cand + b * C * D, *tb = att + b * S * K, *vb = v + b * K * D; \
        const T *sb = sc + b * C * K;                                                                   \
        T *dab = da + b * S * K, *dhb = dh + b * S * D, *dcb = dcand + b * C * D;                        \
        const int64_t n = len[b] < S ? len[b] : S;                                                      \
        for (int64_t i = 0; i < K * D; i++) dv[i] = 0;                                                  \
        for (int64_t c = 0; c < C; c++) {                                                               \
            const T best = out[b * C + c];                                                              \
            int64_t ties = 0;                                                                           \
            for (int64_t k = 0; k < K; k++) ties += sb[c * K + k] == best;                              \
            const T gk = g[b * C + c] / (T)ties;                                                        \
            T *dc = dcb + c * D;                                                                        \
            for (int64_t d = 0; d < D; d++) dc[d] = 0;                                                  \
            for (int64_t k = 0; k < K; k++) {                                                           \
                if (sb[c * K + k] != best) continue;                                                    \
                for (int64_t d = 0; d < D; d++) {                                                       \
                    dc[d] += gk * vb[k * D + d];                                                        \
                    dv[k * D + d] += gk * cb[c * D + d];                                                \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int64_t s = 0; s < S; s++) {                                                               \
            T *dhs = dhb + s * D;                                                                       \
            const T *hs = hb + s * D;                                                                   \
            for (int64_t d = 0; d < D; d++) dhs[d] = 0;                                                 \
            for (int64_t k = 0; k < K; k++) {                                                           \
                const T w = tb[s * K + k];                                                              \
                T dot = 0;                                                                              \
                _Pragma("omp simd reduction(+:dot)")                                                    \
                for (int64_t d = 0; d < D; d++) {                                                       \
                    dhs[d] += w * dv[k * D + d];                                                        \
                    dot += dv[k * D + d] * hs[d];                                                       \
                }                                                                                       \
                datt[s * K + k] = dot;                                                                  \
            }                                                                                           \
        }                                                                                               \
        for (int64_t k = 0; k < K; k++) {  /* softmax's backward over the valid positions */            \
            T dot = 0;                                                                                  \
            for (int64_t s = 0; s < n; s++) dot += tb[s * K + k] * datt[s * K + k];                     \
            for (int64_t s = 0; s < S; s++)                                                             \
                dab[s * K + k] = s < n ? tb[s * K + k] * (datt[s * K + k] - dot) : 0;                       \
        }                                                                                               \
    }                                                                                                   \
}
POOL_SCORE(double, f64, exp)
POOL_SCORE(float, f32, expf)

/* exp of n values in place: float in vectors (expv, the tail through a padded copy), double one at a time */
static void exp_inplace_f64(double *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) a[i] = exp(a[i]);
}
static void exp_inplace_f32(float *a, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) stv(a + i, expv(ldv(a + i)));
    if (i < n) {
        float t[VL] = {0};
        memcpy(t, a + i, (n - i) * sizeof(float));
        stv(t, expv(ldv(t)));
        memcpy(a + i, t, (n - i) * sizeof(float));
    }
}

/* out (D) = sum_{i < n} a[i as] rows[i rs] (n = 0: zeros), the sums in registers; float: D a multiple of VL */
static void combine_f64(double *out, const double *a, int64_t as, const double *rows, int64_t rs, int64_t n,
                        int64_t D) {
    for (int64_t d = 0; d < D; d++) out[d] = 0;
    for (int64_t i = 0; i < n; i++) axpy_f64(out, a[i * as], rows + i * rs, D);
}
static void combine_f32(float *out, const float *a, int64_t as, const float *rows, int64_t rs, int64_t n,
                        int64_t D) {
    for (int64_t d0 = 0; d0 < D; d0 += VL) {
        vf acc = {0};
        for (int64_t i = 0; i < n; i++) acc += a[i * as] * ldv(rows + i * rs + d0);
        stv(out + d0, acc);
    }
}
/* ComiRec-DR's routing at a row's end with the shared maps (readouts.ComiRecDRReadout._interests_last_shared) and the
   best-interest scores (its scores): per row b, over the visible positions s < len_b of x (S, D), `iters` rounds of
   couplings c_ks (1/K in the first, then the softmax over k of the logits), pooled p_k = sum_s c_ks x_s, z_k = W_k p_k,
   v_k = squash(z_k) = f(|z_k|^2) z_k, and between rounds the logits L_ks += x_s . W_k^T v_k; then out_c = max_k
   cand_c . v_k. torch runs this as ~40 small operators and batched products (2.7 ms forward and backward, of a 6.2 ms
   ML-1M study step). Here the rows go in blocks of RB, and per block and interest each map is one product of the
   block's rows (mm_*, the matrix read once a block); the rest goes a row at a time in L1. Between rounds z itself is
   not needed: with M_k = W_k^T W_k (computed once a call), |z_k|^2 = p_k . M_k p_k and W_k^T v_k = f M_k p_k, one
   product a round instead of two (of the forward's five products, three remain). w: (K, E, D), wt: its (K, D, E)
   transpose. The last round's couplings c (B, K, S), pooled p, z and v ((K, B, D), (K, B, E), (K, B, E): a block's
   rows of one interest adjacent) and the scores sc (B, C, K) are kept for the backward, in which only the last round
   carries gradients (the earlier rounds' logits come from detached features, as in torch's). work: K D D + RB K (D +
   S) values. */
#define DR_SCORE(T, SUF, MM, MMDOT, COMBINE, SQRT)                                                              \
void benchbox_dr_score_##SUF(const T *x, const T *w, const T *wt, const int64_t *len, const T *cand, T *c,    \
                             T *p, T *z, T *v, T *sc, T *out, T *work, int64_t B, int64_t S, int64_t K,      \
                             int64_t D, int64_t E, int64_t C, int64_t iters, int64_t RB) {              \
    T *mk = work, *q = work + K * D * D, *lg = q + RB * K * D;  /* (K, D, D), (K, R, D), (R, K, S) */   \
    if (iters > 1)                                                                                      \
        for (int64_t k = 0; k < K; k++) MM(mk + k * D * D, w + k * E * D, w + k * E * D, D, E, D, 1, 1.0, 0); \
    for (int64_t b0 = 0; b0 < B; b0 += RB) {                                                            \
        const int64_t R = B - b0 < RB ? B - b0 : RB;                                                    \
        for (int64_t i = 0; i < R * K * S; i++) lg[i] = 0;                                              \
        for (int64_t it = 0; it < iters; it++) {                                                        \
            const int last = it == iters - 1;                                                           \
            if (it > 0) {  /* the couplings: a softmax over the interests at each visible position */   \
                for (int64_t r = 0; r < R; r++) {                                                       \
                    const int64_t b = b0 + r, n = len[b] < S ? (len[b] > 0 ? len[b] : 0) : S;            \
                    const T *lr = lg + r * K * S;                                                       \
                    T *cb = c + b * K * S;                                                              \
                    for (int64_t s = 0; s < S; s++) {                                                   \
                        T m = lr[s];                                                                    \
                        for (int64_t k = 1; k < K; k++) m = lr[k * S + s] > m ? lr[k * S + s] : m;       \
                        for (int64_t k = 0; k < K; k++) cb[k * S + s] = s < n ? lr[k * S + s] - m : 0;  \
                    }                                                                                   \
                }                                                                                       \
                exp_inplace_##SUF(c + b0 * K * S, R * K * S);                                           \
            }                                                                                           \
            for (int64_t r = 0; r < R; r++) {                                                           \
                const int64_t b = b0 + r, n = len[b] < S ? (len[b] > 0 ? len[b] : 0) : S;                \
                const T *xb = x + b * S * D;                                                            \
                T *cb = c + b * K * S;                                                                  \
                for (int64_t s = 0; s < S; s++) {                                                       \
                    T den = 0;                                                                          \
                    for (int64_t k = 0; k < K; k++) den += cb[k * S + s];                               \
                    for (int64_t k = 0; k < K; k++)                                                     \
                        cb[k * S + s] = s >= n ? 0 : it == 0 ? (T)1 / (T)K : cb[k * S + s] / den;       \
                }                                                                                       \
                for (int64_t k = 0; k < K; k++)  /* pooled */                                           \
                    COMBINE(p + (k * B + b) * D, cb + k * S, 1, xb, D, n, D);                              \
            }                                                                                           \
            if (!last) {  /* the logits' update: L_ks += f_k x_s . q_k, q_k = M_k p_k */                \
                for (int64_t k = 0; k < K; k++)                                                         \
                    MM(q + k * R * D, p + (k * B + b0) * D, mk + k * D * D, R, D, D, 0, 1.0, 0);         \
                for (int64_t r = 0; r < R; r++) {                                                       \
                    const int64_t b = b0 + r, n = len[b] < S ? len[b] : S;                              \
                    if (n <= 0) continue;                                                               \
                    for (int64_t k = 0; k < K; k++) {                                                   \
                        const T *pk = p + (k * B + b) * D, *qk = q + (k * R + r) * D;                   \
                        T n2 = 0, dots[S];                                                              \
                        _Pragma("omp simd reduction(+:n2)")                                             \
                        for (int64_t d = 0; d < D; d++) n2 += pk[d] * qk[d];                            \
                        n2 = n2 > 0 ? n2 : 0;  /* |z|^2 >= 0: rounding may not say so */               \
                        MMDOT(dots, qk, x + b * S * D, 1, n, D, n2 / (1 + n2) / SQRT(n2 + (T)1e-9));     \
                        for (int64_t s = 0; s < n; s++) lg[(r * K + k) * S + s] += dots[s];             \
                    }                                                                                   \
                }                                                                                       \
                continue;                                                                               \
            }                                                                                           \
            for (int64_t k = 0; k < K; k++)                                                             \
                MM(z + (k * B + b0) * E, p + (k * B + b0) * D, wt + k * D * E, R, D, E, 0, 1.0, 0);     \
            for (int64_t k = 0; k < K; k++)                                                             \
                for (int64_t r = 0; r < R; r++) {  /* squash */                                         \
                    const T *zr = z + (k * B + b0 + r) * E;                                             \
                    T *vr = v + (k * B + b0 + r) * E, n2 = 0;                                           \
                    _Pragma("omp simd reduction(+:n2)")                                                 \
                    for (int64_t e = 0; e < E; e++) n2 += zr[e] * zr[e];                                \
                    const T f = n2 / (1 + n2) / SQRT(n2 + (T)1e-9);                                     \
                    for (int64_t e = 0; e < E; e++) vr[e] = zr[e] * f;                                  \
                }                                                                                       \
        }                                                                                               \
        for (int64_t r = 0; r < R; r++) {                                                               \
            const int64_t b = b0 + r;                                                                   \
            for (int64_t cc = 0; cc < C; cc++) {                                                        \
                const T *cv = cand + (b * C + cc) * D;                                                  \
                T best = 0;                                                                             \
                for (int64_t k = 0; k < K; k++) {                                                       \
                    const T *vk = v + (k * B + b) * E;  /* E = D */                                     \
                    T dot = 0;                                                                          \
                    _Pragma("omp simd reduction(+:dot)")                                                \
                    for (int64_t d = 0; d < D; d++) dot += cv[d] * vk[d];                               \
                    sc[(b * C + cc) * K + k] = dot;                                                     \
                    best = k == 0 || dot > best ? dot : best;                                           \
                }                                                                                       \
                out[b * C + cc] = best;                                                                 \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
/* dx (B, S, D), dcand (B, C, D) written; dw (K, E, D) accumulated (the caller zeroes it). work: 3 RB K D values. */ \
void benchbox_dr_score_backward_##SUF(const T *g, const T *x, const T *w, const int64_t *len, const T *cand,      \
        const T *c, const T *p, const T *z, const T *v, const T *sc, const T *out, T *dx, T *dw, T *dcand,    \
        T *work, int64_t B, int64_t S, int64_t K, int64_t D, int64_t E, int64_t C, int64_t RB) {        \
    for (int64_t b0 = 0; b0 < B; b0 += RB) {                                                            \
        const int64_t R = B - b0 < RB ? B - b0 : RB;                                                    \
        T *dv = work, *dz = work + RB * K * E, *dp = work + 2 * RB * K * E;  /* (K, R, E), (K, R, E), (K, R, D) */ \
        for (int64_t i = 0; i < K * R * E; i++) dv[i] = 0;                                              \
        for (int64_t r = 0; r < R; r++) {  /* the scores' backward; ties of the max share, as amax's */ \
            const int64_t b = b0 + r;                                                                   \
            for (int64_t cc = 0; cc < C; cc++) {                                                        \
                const T best = out[b * C + cc], *cv = cand + (b * C + cc) * D, *sb = sc + (b * C + cc) * K; \
                int64_t ties = 0;                                                                       \
                for (int64_t k = 0; k < K; k++) ties += sb[k] == best;                                  \
                const T gk = g[b * C + cc] / (T)ties;                                                   \
                T *dc = dcand + (b * C + cc) * D;                                                       \
                for (int64_t d = 0; d < D; d++) dc[d] = 0;                                              \
                for (int64_t k = 0; k < K; k++) {                                                       \
                    if (sb[k] != best) continue;                                                        \
                    const T *vk = v + (k * B + b) * E;                                                  \
                    T *dvk = dv + (k * R + r) * E;                                                      \
                    for (int64_t d = 0; d < D; d++) { dc[d] += gk * vk[d]; dvk[d] += gk * cv[d]; }      \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int64_t k = 0; k < K; k++)                                                                 \
            for (int64_t r = 0; r < R; r++) {  /* squash's backward: v = f(|z|^2) z */                   \
                const T *zr = z + (k * B + b0 + r) * E, *dvr = dv + (k * R + r) * E;                   \
                T *dzr = dz + (k * R + r) * E, n2 = 0, zd = 0;                                          \
                _Pragma("omp simd reduction(+:n2, zd)")                                                 \
                for (int64_t e = 0; e < E; e++) { n2 += zr[e] * zr[e]; zd += zr[e] * dvr[e]; }          \
                const T rt = SQRT(n2 + (T)1e-9), f = n2 / (1 + n2) / rt;                                \
                const T fp = (1 / (1 + n2) - n2 / (2 * (n2 + (T)1e-9))) / ((1 + n2) * rt);            \
                for (int64_t e = 0; e < E; e++) dzr[e] = f * dvr[e] + 2 * fp * zd * zr[e];              \
            }                                                                                           \
        for (int64_t k = 0; k < K; k++) {                                                               \
            MM(dp + k * R * D, dz + k * R * E, w + k * E * D, R, E, D, 0, 1.0, 0);                      \
            MM(dw + k * E * D, dz + k * R * E, p + (k * B + b0) * D, E, R, D, 1, 1.0, 1);               \
        }                                                                                               \
        for (int64_t r = 0; r < R; r++) {                                                               \
            const int64_t b = b0 + r, n = len[b] < S ? (len[b] > 0 ? len[b] : 0) : S;                    \
            for (int64_t s = 0; s < S; s++)  /* dx_s = sum_k c_ks dp_k */                                \
                COMBINE(dx + (b * S + s) * D, c + b * K * S + s, S, dp + r * D, R * D, s < n ? K : 0, D);      \
        }                                                                                               \
    }                                                                                                   \
}
DR_SCORE(double, f64, mm_f64, mmdot_f64, combine_f64, sqrt)
DR_SCORE(float, f32, mm_f32, mmdot_f32, combine_f32, sqrtf)

/* Mamba's selective scan (mixers.mamba._FusedScan), h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t and
   y_t = C_t . h_t, then y_t += D u_t (dskip not NULL) and y_t *= silu(z_t) (z not NULL), for batches [b0, b1)
   (the caller splits the batch over threads). The state is kept n-major, (N, D) per batch element, so the
   lanes run over D and no step needs a horizontal sum: per step and channel block one exp, two FMAs and the
   output's FMA per state, where the chunked torch path materialises several (B, T, D, N) tensors.
   u, dt, y, ys (the output before the gate, kept for the backward), du, ddt, dz: (B, L, D) contiguous; B and
   C: rows of N at b * bc_sb + t * bc_st; z: rows of D at b * z_sb + t * z_st; at = A^T (N, D); h0, hlast,
   dh0: (B, N, D); ck: the state entering every K-th step, (B, ceil(L / K), N, D), all that the backward keeps
   of the states. The backward recomputes a chunk's K states and decays from its checkpoint into `work`
   ((2 K + 1) N D), then runs the adjoint G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1} backwards through it;
   dat (N, D) and ddskip (D) accumulate this call's dA^T and dD. */
#define SSCAN_NMAX 64
#define SELECTIVE_SCAN(SUF, T, V, W, LD, ST, EXPV, SPLAT, HSUM, SIGV)                                    \
static void selective_scan_range_##SUF(const T *u, const T *dt, const T *at, const T *bm, const T *cm,     \
                                   int64_t bc_sb, int64_t bc_st, const T *z, int64_t z_sb, int64_t z_st, \
                                   const T *dskip, const T *h0, T *y, T *ys, T *hlast, T *ck,           \
                                   int64_t b0, int64_t b1, int64_t L, int64_t D, int64_t N, int64_t K) { \
    const int64_t nck = (L + K - 1) / K, ND = N * D;                                                    \
    for (int64_t b = b0; b < b1; b++) {                                                                 \
        T *h = hlast + b * ND;                                                                          \
        if (h0) memcpy(h, h0 + b * ND, ND * sizeof(T)); else memset(h, 0, ND * sizeof(T));              \
        for (int64_t t = 0; t < L; t++) {                                                               \
            if (t % K == 0) memcpy(ck + (b * nck + t / K) * ND, h, ND * sizeof(T));                     \
            const int64_t row = (b * L + t) * D;                                                        \
            const T *ut = u + row, *dtt = dt + row;                                                     \
            const T *bt = bm + b * bc_sb + t * bc_st, *ct = cm + b * bc_sb + t * bc_st;                 \
            for (int64_t d = 0; d < D; d += W) {                                                        \
                const V dv = LD(dtt + d), bu = dv * LD(ut + d);                                         \
                V acc = SPLAT(0);                                                                       \
                for (int64_t n = 0; n < N; n++) {                                                       \
                    const V hv = EXPV(dv * LD(at + n * D + d)) * LD(h + n * D + d) + bu * bt[n];        \
                    ST(h + n * D + d, hv);                                                              \
                    acc += hv * ct[n];                                                                  \
                }                                                                                       \
                if (dskip) acc += LD(dskip + d) * LD(ut + d);                                           \
                if (z) {                                                                                \
                    const V zv = LD(z + b * z_sb + t * z_st + d);                                       \
                    ST(ys + row + d, acc);                                                              \
                    acc = acc * zv * SIGV(zv);                                                          \
                }                                                                                       \
                ST(y + row + d, acc);                                                                   \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
static void selective_scan_backward_range_##SUF(const T *u, const T *dt, const T *at, const T *bm, const T *cm, \
        int64_t bc_sb, int64_t bc_st, const T *z, int64_t z_sb, int64_t z_st, const T *dskip, const T *ys, \
        const T *dy, const T *dhlast, const T *ck, T *du, T *ddt, T *dbm, T *dcm, T *dz, T *dat, T *ddskip, \
        T *dh0, T *work, int64_t b0, int64_t b1, int64_t L, int64_t D, int64_t N, int64_t K) {          \
    const int64_t nck = (L + K - 1) / K, ND = N * D;                                                    \
    T *hs = work, *as = work + (K + 1) * ND;                                                            \
    V dbacc[SSCAN_NMAX], dcacc[SSCAN_NMAX];                                                             \
    for (int64_t b = b0; b < b1; b++) {                                                                 \
        T *g = dh0 + b * ND;                                                                            \
        if (dhlast) memcpy(g, dhlast + b * ND, ND * sizeof(T)); else memset(g, 0, ND * sizeof(T));      \
        for (int64_t c = nck - 1; c >= 0; c--) {                                                        \
            const int64_t s = c * K, e = s + K < L ? s + K : L;                                         \
            memcpy(hs, ck + (b * nck + c) * ND, ND * sizeof(T));                                        \
            for (int64_t i = 0; i < e - s; i++) {  /* the chunk's decays and states again */            \
                const int64_t t = s + i;                                                                \
                const T *ut = u + (b * L + t) * D, *dtt = dt + (b * L + t) * D;                         \
                const T *bt = bm + b * bc_sb + t * bc_st;                                               \
                const T *hp = hs + i * ND;                                                              \
                T *hn = hs + (i + 1) * ND, *an = as + i * ND;                                           \
                for (int64_t d = 0; d < D; d += W) {                                                    \
                    const V dv = LD(dtt + d), bu = dv * LD(ut + d);                                     \
                    for (int64_t n = 0; n < N; n++) {                                                   \
                        const V a = EXPV(dv * LD(at + n * D + d));                                      \
                        ST(an + n * D + d, a);                                                          \
                        ST(hn + n * D + d, a * LD(hp + n * D + d) + bu * bt[n]);                        \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int64_t i = e - s - 1; i >= 0; i--) {                                                  \
                const int64_t t = s + i, row = (b * L + t) * D;                                         \
                const T *ut = u + row, *dtt = dt + row, *dyt = dy + row;                                \
                const T *bt = bm + b * bc_sb + t * bc_st, *ct = cm + b * bc_sb + t * bc_st;             \
                const T *hp = hs + i * ND, *hc = hs + (i + 1) * ND, *an = as + i * ND;                  \
                for (int64_t n = 0; n < N; n++) { dbacc[n] = SPLAT(0); dcacc[n] = SPLAT(0); }           \
                for (int64_t d = 0; d < D; d += W) {                                                    \
                    const V dv = LD(dtt + d), uv = LD(ut + d), dtu = dv * uv;                           \
                    V dyv = LD(dyt + d), q = SPLAT(0), r = SPLAT(0), dskip_u = SPLAT(0);                \
                    if (z) {  /* through the gate: y = ys silu(z) */                                    \
                        const V zv = LD(z + b * z_sb + t * z_st + d), sg = SIGV(zv);                    \
                        ST(dz + row + d, dyv * LD(ys + row + d) * sg * (1 + zv * (1 - sg)));            \
                        dyv = dyv * zv * sg;                                                            \
                    }                                                                                   \
                    if (dskip) {                                                                        \
                        ST(ddskip + d, LD(ddskip + d) + dyv * uv);                                      \
                        dskip_u = dyv * LD(dskip + d);                                                  \
                    }                                                                                   \
                    for (int64_t n = 0; n < N; n++) {                                                   \
                        const int64_t o = n * D + d;                                                    \
                        const V gv = LD(g + o) + dyv * ct[n], a = LD(an + o), ah = a * LD(hp + o);      \
                        const V gah = gv * ah;                                                          \
                        q += gv * bt[n];                                                                \
                        r += gah * LD(at + o);                                                          \
                        ST(dat + o, LD(dat + o) + gah * dv);                                            \
                        dbacc[n] += gv * dtu;                                                           \
                        dcacc[n] += dyv * LD(hc + o);                                                   \
                        ST(g + o, gv * a);                                                              \
                    }                                                                                   \
                    ST(du + row + d, dv * q + dskip_u);                                                 \
                    ST(ddt + row + d, uv * q + r);                                                      \
                }                                                                                       \
                for (int64_t n = 0; n < N; n++) {                                                       \
                    dbm[(b * L + t) * N + n] = HSUM(dbacc[n]);                                          \
                    dcm[(b * L + t) * N + n] = HSUM(dcacc[n]);                                          \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}

/* Mamba's causal depthwise conv with its SiLU (mixers.mamba._FusedConvSiLU): out_t = silu(bias + sum_k w_k
   x_{t - K + 1 + k}) per channel, in the (B, L, D) layout (torch's conv1d wants (B, D, L): two transposes and a
   copy each way). x: rows of D at b * x_sb + t * x_st; wt = the weight as (K, D); out, dx: (B, L, D). The
   backward recomputes the pre-activation; dwt (K, D) and dbias (D) accumulate this call's part, pre (L D) is
   its scratch. */
#define CONV_SILU(SUF, T, V, W, LD, ST, SPLAT, SIGV)                                                      \
static inline V conv_pre_##SUF(const T *xb, int64_t x_st, const T *wt, const T *bias, int64_t t, int64_t d, \
                               int64_t D, int64_t K) {                                                  \
    V acc = LD(bias + d);                                                                               \
    for (int64_t k = 0; k < K; k++) {                                                                   \
        const int64_t s = t - K + 1 + k;                                                                \
        if (s >= 0) acc += LD(wt + k * D + d) * LD(xb + s * x_st + d);                                  \
    }                                                                                                   \
    return acc;                                                                                         \
}                                                                                                       \
static void conv_silu_range_##SUF(const T *x, int64_t x_sb, int64_t x_st, const T *wt, const T *bias, T *out, \
                              int64_t b0, int64_t b1, int64_t L, int64_t D, int64_t K) {                \
    for (int64_t b = b0; b < b1; b++)                                                                   \
        for (int64_t t = 0; t < L; t++)                                                                 \
            for (int64_t d = 0; d < D; d += W) {                                                        \
                const V p = conv_pre_##SUF(x + b * x_sb, x_st, wt, bias, t, d, D, K);                   \
                ST(out + (b * L + t) * D + d, p * SIGV(p));                                             \
            }                                                                                           \
}                                                                                                       \
static void conv_silu_backward_range_##SUF(const T *x, int64_t x_sb, int64_t x_st, const T *wt, const T *bias, \
                                       const T *dout, T *dx, T *dwt, T *dbias, T *pre, int64_t b0, int64_t b1, \
                                       int64_t L, int64_t D, int64_t K) {                               \
    for (int64_t b = b0; b < b1; b++) {                                                                 \
        const T *xb = x + b * x_sb;                                                                     \
        for (int64_t t = 0; t < L; t++)                                                                 \
            for (int64_t d = 0; d < D; d += W) {                                                        \
                const V p = conv_pre_##SUF(xb, x_st, wt, bias, t, d, D, K), sg = SIGV(p);               \
                const V gp = LD(dout + (b * L + t) * D + d) * sg * (1 + p * (1 - sg));                  \
                ST(pre + t * D + d, gp);                                                                \
                ST(dbias + d, LD(dbias + d) + gp);                                                      \
                for (int64_t k = 0; k < K; k++) {                                                       \
                    const int64_t s = t - K + 1 + k;                                                    \
                    if (s >= 0) ST(dwt + k * D + d, LD(dwt + k * D + d) + gp * LD(xb + s * x_st + d));  \
                }                                                                                       \
            }                                                                                           \
        for (int64_t s = 0; s < L; s++)                                                                 \
            for (int64_t d = 0; d < D; d += W) {                                                        \
                V acc = SPLAT(0);                                                                       \
                for (int64_t k = 0; k < K; k++) {                                                       \
                    const int64_t t = s + K - 1 - k;                                                    \
                    if (t < L) acc += LD(wt + k * D + d) * LD(pre + t * D + d);                         \
                }                                                                                       \
                ST(dx + (b * L + s) * D + d, acc);                                                      \
            }                                                                                           \
    }                                                                                                   \
}
#define SS_LD1(p) (*(p))
#define SS_ST1(p, v) (*(p) = (v))
#define SS_SPLAT1(x) ((double)(x))
#define SS_HSUM1(x) (x)
#define SS_SIG1(x) (1.0 / (1.0 + exp(-(x))))
#define SPLATV(x) ((vf){0} + (float)(x))
SELECTIVE_SCAN(f64, double, double, 1, SS_LD1, SS_ST1, exp, SS_SPLAT1, SS_HSUM1, SS_SIG1)
SELECTIVE_SCAN(f32, float, vf, VL, ldv, stv, expv, SPLATV, hsumv, sigmoidv)
CONV_SILU(f64, double, double, 1, SS_LD1, SS_ST1, SS_SPLAT1, SS_SIG1)
CONV_SILU(f32, float, vf, VL, ldv, stv, SPLATV, sigmoidv)

/* TTT-MLP's chunk of one mini-batch (mixers.ttt._MLPChunk with g == 1, every chunk of the default scan), per (row,
   head) block with every intermediate in a per-thread scratch that stays in L2: the torch path's batched products
   and elementwise passes each stream (B H, S, 4 D) tensors through memory, which bounds it (a (256, 32, 128) bmm
   runs no faster on two threads than on one). The backward recomputes the block's forward (nothing but the inputs is
   kept) and then runs the same VJP as the torch path. Its products are mm_T and mmdot_T (above); the tanh-GELU
   pieces are mixers.ttt's (_gelu_t, _gelu_p, _gelu_pp). */
#define GELU_A 0.044715
#define GELU_C 0.7978845608028654
#define MLP_CHUNK(T, SUF, MM, MMDOT, V, W, LD, ST, EXPV)                                               \
static inline V gelu_t_##SUF(V z) {  /* tanh(c (z + a z^3)) as 2 sigmoid(2 u) - 1, as the torch path */     \
    const V u = (z * z * (T)(2 * GELU_A * GELU_C) + (T)(2 * GELU_C)) * z;                               \
    return (T)2 / ((T)1 + EXPV(-u)) - (T)1;                                                             \
}                                                                                                       \
static inline V gelu_p_##SUF(V z, V t) {                                                                \
    const V up = z * z * (T)(3 * GELU_A * GELU_C) + (T)GELU_C;                                          \
    return (((T)1 - t * t) * up * z + t + (T)1) * (T)0.5;                                               \
}                                                                                                       \
static inline V gelu_pp_##SUF(V z, V t) {                                                               \
    const V zz = z * z, up = zz * (T)(3 * GELU_A * GELU_C) + (T)GELU_C;                                 \
    return ((T)1 - t * t) * (up - up * up * t * z + zz * (T)(3 * GELU_A * GELU_C));                     \
}                                                                                                       \
/* the block's forward into scratch x: z1, t1, X2, G1, gx, Z1q, tq, X2q (S F), W2T (D F), G2, xh, gxl (S D),   \
   rstd, mean (S), Yc = (X2q X2^T + 1) coef and Y2 (S S); Zq (S D) into zq */                               \
static void mlp_block_##SUF(const T *kq, const T *W1, const T *b1, const T *W2, const T *b2, const T *gt,   \
                            const T *gam2, const T *P, const T *coef, T *zq, T *x, int64_t S, int64_t D,    \
                            int64_t F, double eps) {                                                    \
    T *z1 = x, *t1 = z1 + S * F, *X2 = t1 + S * F, *G1 = X2 + S * F, *gx = G1 + S * F, *Z1q = gx + S * F; \
    T *tq = Z1q + S * F, *X2q = tq + S * F, *W2T = X2q + S * F, *G2 = W2T + D * F, *xh = G2 + S * D;     \
    T *gxl = xh + S * D, *rstd = gxl + S * D, *mean = rstd + S, *Yc = mean + S, *Y2 = Yc + S * S;       \
    T *z2 = Y2 + S * S;                                                                                 \
    for (int64_t s = 0; s < S; s++)                                                                     \
        for (int64_t f = 0; f < F; f++) { z1[s * F + f] = b1[f]; Z1q[s * F + f] = b1[f]; }              \
    MM(z1, kq, W1, S, D, F, 0, 1, 1);                                                                   \
    MM(Z1q, kq + S * D, W1, S, D, F, 0, 1, 1);                                                          \
    for (int64_t i = 0; i < S * F; i += W) {                                                            \
        const V z = LD(z1 + i), t = gelu_t_##SUF(z);                                                    \
        ST(t1 + i, t);                                                                                  \
        ST(X2 + i, (T)0.5 * z * ((T)1 + t));                                                            \
    }                                                                                                   \
    for (int64_t s = 0; s < S; s++)                                                                     \
        for (int64_t d = 0; d < D; d++) z2[s * D + d] = b2[d];                                          \
    MM(z2, X2, W2, S, F, D, 0, 1, 1);                                                                   \
    lnl2_rows_##SUF(z2, gam2, gt, xh, mean, rstd, gxl, G2, S, D, S, eps);                               \
    transpose_##SUF(W2T, W2, F, D);                                                                     \
    MM(gx, G2, W2T, S, D, F, 0, 1, 0);                                                                  \
    for (int64_t i = 0; i < S * F; i += W) ST(G1 + i, LD(gx + i) * gelu_p_##SUF(LD(z1 + i), LD(t1 + i))); \
    MM(Z1q, P, G1, S, S, F, 0, -1, 1);                                                                  \
    for (int64_t i = 0; i < S * F; i += W) {                                                            \
        const V z = LD(Z1q + i), t = gelu_t_##SUF(z);                                                   \
        ST(tq + i, t);                                                                                  \
        ST(X2q + i, (T)0.5 * z * ((T)1 + t));                                                           \
    }                                                                                                   \
    MMDOT(Y2, X2q, X2, S, S, F, 1);                                                                     \
    for (int64_t i = 0; i < S * S; i++) { Y2[i] += (T)1; Yc[i] = Y2[i] * coef[i]; }                     \
    for (int64_t s = 0; s < S; s++)                                                                     \
        for (int64_t d = 0; d < D; d++) zq[s * D + d] = b2[d];                                          \
    MM(zq, X2q, W2, S, F, D, 0, 1, 1);                                                                  \
    MM(zq, Yc, G2, S, S, D, 0, -1, 1);                                                                  \
}                                                                                                       \
static int64_t mlp_scratch_##SUF(int64_t S, int64_t D, int64_t F) {                                     \
    return 8 * S * F + D * F + 4 * S * D + 2 * S + 2 * S * S;                                           \
}                                                                                                       \
static void mlp_chunk_forward_range_##SUF(const T *kq, const T *W1, const T *b1, const T *W2, const T *b2,   \
        const T *gt, const T *gam2, const T *P, const T *coef, const T *eT, T *zq, T *W1n, T *b1n, T *W2n,    \
        T *b2n, T *work,                                                                                \
        int64_t e0, int64_t e1, int64_t S, int64_t D, int64_t F, double eps) {                          \
    T *x = work, *eg = work + mlp_scratch_##SUF(S, D, F);  /* eG1 (S F), eG2 (S D) */                   \
    for (int64_t e = e0; e < e1; e++) {                                                                 \
        const T *kqe = kq + e * 2 * S * D, *W1e = W1 + e * D * F, *W2e = W2 + e * F * D;                \
        mlp_block_##SUF(kqe, W1e, b1 + e * F, W2e, b2 + e * D, gt + e * S * D, gam2 + e * D, P + e * S * S, \
                        coef + e * S * S, zq + e * S * D, x, S, D, F, eps);                             \
        if (!W1n) continue;                                                                             \
        const T *X2 = x + 2 * S * F, *G1 = x + 3 * S * F, *G2 = x + 8 * S * F + D * F;                  \
        const T *ee = eT + e * S;                                                                       \
        T *eG1 = eg, *eG2 = eg + S * F;                                                                 \
        for (int64_t s = 0; s < S; s++) {                                                               \
            for (int64_t f = 0; f < F; f++) eG1[s * F + f] = ee[s] * G1[s * F + f];                     \
            for (int64_t d = 0; d < D; d++) eG2[s * D + d] = ee[s] * G2[s * D + d];                     \
        }                                                                                               \
        memcpy(W1n + e * D * F, W1e, D * F * sizeof(T));                                                \
        MM(W1n + e * D * F, kqe, eG1, D, S, F, 1, -1, 1);                                               \
        memcpy(W2n + e * F * D, W2e, F * D * sizeof(T));                                                \
        MM(W2n + e * F * D, X2, eG2, F, S, D, 1, -1, 1);                                                \
        for (int64_t f = 0; f < F; f++) {                                                               \
            T sm = 0;                                                                                   \
            for (int64_t s = 0; s < S; s++) sm += eG1[s * F + f];                                       \
            b1n[e * F + f] = b1[e * F + f] - sm;                                                        \
        }                                                                                               \
        for (int64_t d = 0; d < D; d++) {                                                               \
            T sm = 0;                                                                                   \
            for (int64_t s = 0; s < S; s++) sm += eG2[s * D + d];                                       \
            b2n[e * D + d] = b2[e * D + d] - sm;                                                        \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
static void colsum_acc_##SUF(T *out, const T *a, int64_t R, int64_t C) {                                \
    for (int64_t r = 0; r < R; r++)                                                                     \
        for (int64_t c = 0; c < C; c++) out[c] += a[r * C + c];                                         \
}                                                                                                       \
static void mlp_chunk_backward_range_##SUF(const T *kq, const T *W1, const T *b1, const T *W2, const T *b2,     \
        const T *gt, const T *gam2, const T *P, const T *coef, const T *eT, const T *dZq, const T *dW1n,    \
        const T *db1n, const T *dW2n, const T *db2n, T *dkq, T *dW1, T *db1, T *dW2, T *db2, T *dgt, T *dgam2, \
        T *dP, T *dcoef, T *de, T *work, int64_t e0, int64_t e1, int64_t S, int64_t D, int64_t F, double eps) { \
    T *x = work, *y = work + mlp_scratch_##SUF(S, D, F);                                                \
    T *zq = y, *dG1 = zq + S * D, *dX2 = dG1 + S * F, *dX2q = dX2 + S * F, *dZ1q = dX2q + S * F;        \
    T *dz1 = dZ1q + S * F, *dgx = dz1 + S * F, *eG = dgx + S * F, *W1T = eG + S * F, *dG2 = W1T + F * D; \
    T *dz2 = dG2 + S * D, *dK = dz2 + S * D, *dA2 = dK + S * D, *tmp = dA2 + S * S;  /* tmp: S F */       \
    T dxh[256];                                                                                         \
    for (int64_t e = e0; e < e1; e++) {                                                                 \
        const T *kqe = kq + e * 2 * S * D, *W1e = W1 + e * D * F, *W2e = W2 + e * F * D;                \
        const T *Pe = P + e * S * S, *ce = coef + e * S * S, *ee = eT + e * S, *dZ = dZq + e * S * D;   \
        const T *g2e = gam2 + e * D;                                                                    \
        mlp_block_##SUF(kqe, W1e, b1 + e * F, W2e, b2 + e * D, gt + e * S * D, g2e, Pe, ce, zq, x, S, D, F, eps); \
        const T *z1 = x, *t1 = z1 + S * F, *X2 = t1 + S * F, *G1 = X2 + S * F, *gx = G1 + S * F;       \
        const T *Z1q = gx + S * F, *tq = Z1q + S * F, *X2q = tq + S * F, *W2T = X2q + S * F;           \
        const T *G2 = W2T + D * F, *xh = G2 + S * D, *gxl = xh + S * D, *rstd = gxl + S * D;           \
        const T *Yc = rstd + 2 * S, *Y2 = Yc + S * S;                                                   \
        T *dW1e = dW1 + e * D * F, *db1e = db1 + e * F, *dW2e = dW2 + e * F * D, *db2e = db2 + e * D;  \
        T *dee = de + e * S, *dg2e = dgam2 + e * D;                                                     \
        if (dW1n) {  /* the weights after the chunk: W1n = W1 - K^T (e G1), b1n = b1 - sum e G1, the same for W2 */ \
            const T *dW1ne = dW1n + e * D * F, *dW2ne = dW2n + e * F * D;                               \
            T *dEG1 = dG1, *dEG2 = dG2;  /* d(e G1), d(e G2), made dG1, dG2 in place below */            \
            for (int64_t s = 0; s < S; s++) {                                                           \
                for (int64_t f = 0; f < F; f++) dEG1[s * F + f] = -db1n[e * F + f];                     \
                for (int64_t d = 0; d < D; d++) dEG2[s * D + d] = -db2n[e * D + d];                     \
            }                                                                                           \
            MM(dEG1, kqe, dW1ne, S, D, F, 0, -1, 1);                                                    \
            MM(dEG2, X2, dW2ne, S, F, D, 0, -1, 1);                                                     \
            for (int64_t s = 0; s < S; s++) {                                                           \
                T a = 0;                                                                                \
                for (int64_t f = 0; f < F; f++) {                                                       \
                    a += G1[s * F + f] * dEG1[s * F + f];                                               \
                    eG[s * F + f] = ee[s] * G1[s * F + f];                                              \
                    dG1[s * F + f] = ee[s] * dEG1[s * F + f];                                           \
                }                                                                                       \
                for (int64_t d = 0; d < D; d++) {                                                       \
                    a += G2[s * D + d] * dEG2[s * D + d];                                               \
                    dG2[s * D + d] *= ee[s];                                                            \
                }                                                                                       \
                dee[s] = a;                                                                             \
            }                                                                                           \
            MMDOT(dK, eG, dW1ne, S, D, F, -1);  /* -(e G1) dW1n^T */                                    \
            for (int64_t s = 0; s < S; s++)                                                             \
                for (int64_t d = 0; d < D; d++) tmp[s * D + d] = ee[s] * G2[s * D + d];                 \
            transpose_##SUF(W1T, dW2ne, F, D);  /* dW2n^T (D F), in W1T's space for now */              \
            MM(dX2, tmp, W1T, S, D, F, 0, -1, 0);                                                       \
            memcpy(dW1e, dW1ne, D * F * sizeof(T));                                                     \
            memcpy(db1e, db1n + e * F, F * sizeof(T));                                                  \
            memcpy(dW2e, dW2ne, F * D * sizeof(T));                                                     \
            memcpy(db2e, db2n + e * D, D * sizeof(T));                                                  \
        } else {                                                                                        \
            memset(dG1, 0, S * F * sizeof(T)); memset(dX2, 0, S * F * sizeof(T));                       \
            memset(dG2, 0, S * D * sizeof(T)); memset(dK, 0, S * D * sizeof(T));                        \
            memset(dee, 0, S * sizeof(T));                                                              \
            memset(dW1e, 0, D * F * sizeof(T)); memset(db1e, 0, F * sizeof(T));                         \
            memset(dW2e, 0, F * D * sizeof(T)); memset(db2e, 0, D * sizeof(T));                         \
        }                                                                                               \
        /* Zq = X2q W2 + b2 - Yc G2, Yc = (X2q X2^T + 1) coef */                                        \
        MM(dX2q, dZ, W2T, S, D, F, 0, 1, 0);                                                            \
        MM(dW2e, X2q, dZ, F, S, D, 1, 1, 1);                                                            \
        colsum_acc_##SUF(db2e, dZ, S, D);                                                               \
        MMDOT(dA2, dZ, G2, S, S, D, -1);                                                                \
        MM(dG2, Yc, dZ, S, S, D, 1, -1, 1);                                                             \
        T *dcoefe = dcoef + e * S * S;                                                                  \
        for (int64_t i = 0; i < S * S; i++) { dcoefe[i] = dA2[i] * Y2[i]; dA2[i] *= ce[i]; }  /* dA2 -> dT */ \
        MM(dX2q, dA2, X2, S, S, F, 0, 1, 1);                                                            \
        MM(dX2, dA2, X2q, S, S, F, 1, 1, 1);                                                            \
        /* X2q = gelu(Z1q), Z1q = Q W1 + b1 - P G1 */                                                   \
        for (int64_t i = 0; i < S * F; i += W)                                                          \
            ST(dZ1q + i, LD(dX2q + i) * gelu_p_##SUF(LD(Z1q + i), LD(tq + i)));                         \
        MMDOT(dP + e * S * S, dZ1q, G1, S, S, F, -1);                                                   \
        MM(dG1, Pe, dZ1q, S, S, F, 1, -1, 1);                                                           \
        /* the K side: G1 = gx gelu'(z1), gx = G2 W2^T, G2 = lnl2(X2 W2 + b2), X2 = gelu(z1) */          \
        for (int64_t i = 0; i < S * F; i += W) {                                                        \
            const V z = LD(z1 + i), t = LD(t1 + i), gp = gelu_p_##SUF(z, t), dg = LD(dG1 + i);          \
            ST(dgx + i, dg * gp);                                                                       \
            ST(dz1 + i, dg * LD(gx + i) * gelu_pp_##SUF(z, t));                                         \
            ST(tmp + i, gp);                                                                            \
        }                                                                                               \
        MM(dG2, dgx, W2e, S, F, D, 0, 1, 1);                                                            \
        memset(dg2e, 0, D * sizeof(T));                                                                 \
        lnl2_vjp_rows_##SUF(dG2, G2, xh, rstd, gxl, g2e, dz2, dgt + e * S * D, dg2e, dxh, S, D, S);      \
        MM(dX2, dz2, W2T, S, D, F, 0, 1, 1);                                                            \
        for (int64_t i = 0; i < S * F; i++) dz1[i] += dX2[i] * tmp[i];                                  \
        MM(dW2e, dgx, G2, F, S, D, 1, 1, 1);                                                            \
        MM(dW2e, X2, dz2, F, S, D, 1, 1, 1);                                                            \
        colsum_acc_##SUF(db2e, dz2, S, D);                                                              \
        /* Z1 = [K; Q] W1 + b1 */                                                                       \
        MM(dW1e, kqe, dz1, D, S, F, 1, 1, 1);                                                           \
        MM(dW1e, kqe + S * D, dZ1q, D, S, F, 1, 1, 1);                                                  \
        colsum_acc_##SUF(db1e, dz1, S, F);                                                              \
        colsum_acc_##SUF(db1e, dZ1q, S, F);                                                             \
        transpose_##SUF(W1T, W1e, D, F);                                                                \
        T *dk = dkq + e * 2 * S * D, *dq = dk + S * D;                                                  \
        MM(dk, dz1, W1T, S, F, D, 0, 1, 0);                                                             \
        for (int64_t i = 0; i < S * D; i++) dk[i] += dK[i];                                             \
        MM(dq, dZ1q, W1T, S, F, D, 0, 1, 0);                                                            \
    }                                                                                                   \
}
MLP_CHUNK(double, f64, mm_f64, mmdot_f64, double, 1, SS_LD1, SS_ST1, exp)
MLP_CHUNK(float, f32, mm_f32, mmdot_f32, vf, VL, ldv, stv, expv)

/* The threaded kernels' entry points: the batch cut into `parts` ranges run by one OpenMP loop (each range with its
   own slice of the per-part scratch and sums). The library is built with -fopenmp and loaded after torch, whose
   wheel carries libgomp.so.1: the loader binds this library to that same runtime, so these loops run on torch's own
   OpenMP threads. (A pool of Python threads calling the ranges competed for the two cores with those threads still
   spinning after torch's last parallel operator: TTT-Linear's window kernels took 1.26 ms a step where they run in
   0.76 ms alone.) Without OpenMP the loop runs the ranges one after the other. */
#define PARTS(CALL)                                                                                     \
    _Pragma("omp parallel for num_threads(parts) schedule(static)")                                     \
    for (int64_t p_ = 0; p_ < parts; p_++) {                                                            \
        const int64_t b0 = batch * p_ / parts, b1 = batch * (p_ + 1) / parts;                           \
        CALL;                                                                                           \
    }
/* The per-part scratch of the TTT-MLP chunk kernels and the per-block save of the window kernels, in values: the
   Python side allocates what these say (one definition of each size). */
int64_t benchbox_mlp_chunk_work(int64_t S, int64_t D, int64_t F, int backward) {
    return mlp_scratch_f32(S, D, F) + (backward ? 8 * S * F + F * D + 4 * S * D + S * S : S * F + S * D);
}
int64_t benchbox_ttt_window_save(int64_t L, int64_t SC, int64_t D) { return TTT_WINDOW_SAVE(L, SC, D); }
#define THREADED(T, SUF)                                                                                 \
void benchbox_selective_scan_##SUF(const T *u, const T *dt, const T *at, const T *bm, const T *cm, int64_t bc_sb, \
        int64_t bc_st, const T *z, int64_t z_sb, int64_t z_st, const T *dskip, const T *h0, T *y, T *ys, T *hlast, \
        T *ck, int64_t batch, int64_t parts, int64_t L, int64_t D, int64_t N, int64_t K) {              \
    PARTS(selective_scan_range_##SUF(u, dt, at, bm, cm, bc_sb, bc_st, z, z_sb, z_st, dskip, h0, y, ys, hlast, ck, \
                                     b0, b1, L, D, N, K))                                               \
}                                                                                                       \
void benchbox_selective_scan_backward_##SUF(const T *u, const T *dt, const T *at, const T *bm, const T *cm,  \
        int64_t bc_sb, int64_t bc_st, const T *z, int64_t z_sb, int64_t z_st, const T *dskip, const T *ys,   \
        const T *dy, const T *dhlast, const T *ck, T *du, T *ddt, T *dbm, T *dcm, T *dz, T *dat, T *ddskip,  \
        T *dh0, T *work, int64_t batch, int64_t parts, int64_t L, int64_t D, int64_t N, int64_t K) {     \
    PARTS(selective_scan_backward_range_##SUF(u, dt, at, bm, cm, bc_sb, bc_st, z, z_sb, z_st, dskip, ys, dy, dhlast, \
            ck, du, ddt, dbm, dcm, dz, dat + p_ * N * D, ddskip + p_ * D, dh0, work + p_ * (2 * K + 1) * N * D, \
            b0, b1, L, D, N, K))                                                                        \
}                                                                                                       \
void benchbox_conv_silu_##SUF(const T *x, int64_t x_sb, int64_t x_st, const T *wt, const T *bias, T *out,    \
                              int64_t batch, int64_t parts, int64_t L, int64_t D, int64_t K) {          \
    PARTS(conv_silu_range_##SUF(x, x_sb, x_st, wt, bias, out, b0, b1, L, D, K))                         \
}                                                                                                       \
void benchbox_conv_silu_backward_##SUF(const T *x, int64_t x_sb, int64_t x_st, const T *wt, const T *bias,   \
        const T *dout, T *dx, T *dwt, T *dbias, T *pre, int64_t batch, int64_t parts, int64_t L, int64_t D,  \
        int64_t K) {                                                                                    \
    PARTS(conv_silu_backward_range_##SUF(x, x_sb, x_st, wt, bias, dout, dx, dwt + p_ * K * D, dbias + p_ * D,  \
                                         pre + p_ * L * D, b0, b1, L, D, K))                            \
}                                                                                                       \
void benchbox_ttt_window_forward_##SUF(const T *proj, int64_t ps, const T *lrb, const T *tok, const T *W,   \
        const T *bias1, const T *gam, const T *bet, const T *cs, double eta_scale, T *out, T *save,      \
        int64_t batch, int64_t parts, int64_t S, int64_t H, int64_t D, int64_t K, int64_t SC, double eps) { \
    PARTS(ttt_window_forward_range_##SUF(proj, ps, lrb, tok, W, bias1, gam, bet, cs, eta_scale, out, save, b0, b1, \
                                         S, H, D, K, SC, eps))                                          \
}                                                                                                       \
void benchbox_ttt_window_backward_##SUF(const T *proj, int64_t ps, const T *tok, const T *gam, const T *cs,  \
        double eta_scale, const T *save, const T *dout, T *dproj, T *dW, T *db, T *dgam, T *dbet, T *dtok,  \
        T *dlrb, int64_t batch, int64_t parts, int64_t S, int64_t H, int64_t D, int64_t K, int64_t SC) {  \
    PARTS(ttt_window_backward_range_##SUF(proj, ps, tok, gam, cs, eta_scale, save, dout, dproj,          \
            dW + p_ * H * D * D, db + p_ * H * D, dgam + p_ * H * D, dbet + p_ * H * D, dtok + p_ * K,   \
            dlrb + p_ * H, b0, b1, S, H, D, K, SC))                                                     \
}                                                                                                       \
void benchbox_mlp_chunk_forward_##SUF(const T *kq, const T *W1, const T *bias1, const T *W2, const T *b2,    \
        const T *gt, const T *gam2, const T *P, const T *coef, const T *eT, T *zq, T *W1n, T *b1n, T *W2n,  \
        T *b2n, T *work, int64_t batch, int64_t parts, int64_t S, int64_t D, int64_t F, double eps) {   \
    const int64_t ws = benchbox_mlp_chunk_work(S, D, F, 0);                                             \
    PARTS(mlp_chunk_forward_range_##SUF(kq, W1, bias1, W2, b2, gt, gam2, P, coef, eT, zq, W1n, b1n, W2n, b2n, \
                                        work + p_ * ws, b0, b1, S, D, F, eps))                          \
}                                                                                                       \
void benchbox_mlp_chunk_backward_##SUF(const T *kq, const T *W1, const T *bias1, const T *W2, const T *b2,   \
        const T *gt, const T *gam2, const T *P, const T *coef, const T *eT, const T *dZq, const T *dW1n,   \
        const T *db1n, const T *dW2n, const T *db2n, T *dkq, T *dW1, T *db1, T *dW2, T *db2, T *dgt,     \
        T *dgam2, T *dP, T *dcoef, T *de, T *work, int64_t batch, int64_t parts, int64_t S, int64_t D,   \
        int64_t F, double eps) {                                                                        \
    const int64_t ws = benchbox_mlp_chunk_work(S, D, F, 1);                                             \
    PARTS(mlp_chunk_backward_range_##SUF(kq, W1, bias1, W2, b2, gt, gam2, P, coef, eT, dZq, dW1n, db1n, dW2n, \
            db2n, dkq, dW1, db1, dW2, db2, dgt, dgam2, dP, dcoef, de, work + p_ * ws, b0, b1, S, D, F, eps)) \
}
THREADED(double, f64)
THREADED(float, f32)
/* candidate_dot (readouts.candidate_dot) for few candidates a row: out[r, c] = cand[r, c] . f[r] over rows r of C
   candidates (R, C, D) and features (R, D), and its backward, dcand[r, c] = g[r, c] f[r] and df[r] = sum_c g[r, c]
   cand[r, c], in one pass each way. torch's multiply-and-sum makes a (R, C, D) product forward and two backward, each a
   fresh tensor: at the sequence regime's 128 x 200 positions x 5 candidates x 64 (33 MB each) forward and backward
   took 48 ms alone, 8 here (in ML-1M's training steps the saving is smaller: SASRec 260.5 -> 251.5 ms a step over the
   same batches). dcand stays (the gather's backward reads it) and is the same product as torch's, bit for bit; the
   dots sum in another order. Rows [r0, r1): the caller's threads split them. */
#define CAND_DOT(T, SUF)                                                                                \
static void cand_dot_range_##SUF(const T *cand, const T *f, T *out, int64_t r0, int64_t r1, int64_t C,  \
                                  int64_t D) {                                                          \
    for (int64_t r = r0; r < r1; r++)                                                                   \
        for (int64_t c = 0; c < C; c++) {                                                               \
            const T *cv = cand + (r * C + c) * D, *fr = f + r * D;                                      \
            T dot = 0;                                                                                  \
            _Pragma("omp simd reduction(+:dot)")                                                        \
            for (int64_t d = 0; d < D; d++) dot += cv[d] * fr[d];                                       \
            out[r * C + c] = dot;                                                                       \
        }                                                                                               \
}                                                                                                       \
static void cand_dot_backward_range_##SUF(const T *g, const T *cand, const T *f, T *dcand, T *df,     \
                                           int64_t r0, int64_t r1, int64_t C, int64_t D) {             \
    for (int64_t r = r0; r < r1; r++) {                                                                 \
        const T *fr = f + r * D;                                                                        \
        T *dfr = df ? df + r * D : NULL;                                                                \
        if (dfr) for (int64_t d = 0; d < D; d++) dfr[d] = 0;                                            \
        for (int64_t c = 0; c < C; c++) {                                                               \
            const T gc = g[r * C + c], *cv = cand + (r * C + c) * D;                                    \
            T *dc = dcand ? dcand + (r * C + c) * D : NULL;                                             \
            if (dc) for (int64_t d = 0; d < D; d++) dc[d] = gc * fr[d];                                 \
            if (dfr) for (int64_t d = 0; d < D; d++) dfr[d] += gc * cv[d];                              \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
void benchbox_cand_dot_##SUF(const T *cand, const T *f, T *out, int64_t batch, int64_t C, int64_t D,     \
                             int64_t parts) {                                                           \
    PARTS(cand_dot_range_##SUF(cand, f, out, b0, b1, C, D))                                             \
}                                                                                                       \
void benchbox_cand_dot_backward_##SUF(const T *g, const T *cand, const T *f, T *dcand, T *df, int64_t batch, \
                                      int64_t C, int64_t D, int64_t parts) {                           \
    PARTS(cand_dot_backward_range_##SUF(g, cand, f, dcand, df, b0, b1, C, D))                           \
}
CAND_DOT(double, f64)
CAND_DOT(float, f32)
/* o[k ks + s] = softmax over k of l[k ks + s], at each s < n (ComiRec-DR's couplings over its interests); float: n a
   multiple of VL, in vectors */
static void softmax_over_k_f64(const double *l, double *o, int64_t K, int64_t ks, int64_t n) {
    for (int64_t s = 0; s < n; s++) {
        double m = l[s], den = 0;
        for (int64_t k = 1; k < K; k++) m = l[k * ks + s] > m ? l[k * ks + s] : m;
        for (int64_t k = 0; k < K; k++) { o[k * ks + s] = exp(l[k * ks + s] - m); den += o[k * ks + s]; }
        for (int64_t k = 0; k < K; k++) o[k * ks + s] /= den;
    }
}
static void softmax_over_k_f32(const float *l, float *o, int64_t K, int64_t ks, int64_t n) {
    for (int64_t s = 0; s < n; s += VL) {
        vf m = ldv(l + s), den = {0};
        for (int64_t k = 1; k < K; k++) {
            const vf a = ldv(l + k * ks + s);
            const vi gt = a > m;
            m = (vf)(((vi)a & gt) | ((vi)m & ~gt));
        }
        for (int64_t k = 0; k < K; k++) {
            const vf e = expv(ldv(l + k * ks + s) - m);
            stv(o + k * ks + s, e);
            den += e;
        }
        for (int64_t k = 0; k < K; k++) stv(o + k * ks + s, ldv(o + k * ks + s) / den);
    }
}
/* ComiRec-DR's causal routing with the shared maps, the rounds without gradients
   (readouts.ComiRecDRReadout._interests_causal_shared): for every user b and target t, the routing of dr_score over the
   visible history s <= t, s < len_b, run for a block of R = tblock targets at once. Its output is the last round's
   couplings c[b, t, k, s] (B, S, K, S), written for s below the target block's end (zeros where not visible), which
   torch's _BlockCausalPoolShared then pools with gradients. torch's blocked path runs each block as batched products
   over the users with softmax, mask and copy passes over (B, R, K, t1) tensors out of cache (~240 of 440 ms forward and
   backward at 128 users x 200); here a block's logits, couplings and pooled vectors stay in L2, and each round is one
   product a block per interest: logits L_k (R, t1) = Y_k X^T, pooled P_k (R, D) = C_k X, Q_k = P_k M_k (M_k = W_k^T
   W_k: W_k^T squash(W_k p) = f(p . M_k p) M_k p, see readouts._routed_back). The first round's pooled vector is the
   running mean of the visible features, the same for every interest. mcat: M_k side by side, (D, K D); work per part:
   dr_route_causal_work(). */
int64_t benchbox_dr_route_causal_work(int64_t S, int64_t K, int64_t D, int64_t R) {
    const int64_t sp = (S + 15) / 16 * 16;
    return D * sp + 2 * K * R * sp + K * R * S + 3 * K * R * D + R * D + D;
}
#define DR_ROUTE_CAUSAL(T, SUF, MM, TRANSPOSE, SQRT)                                                             \
static void dr_route_causal_range_##SUF(const T *x, const T *mk, const T *mcat, const int64_t *len, T *c,   \
        T *work, int64_t b0, int64_t b1, int64_t S, int64_t K, int64_t D, int64_t iters, int64_t R) {    \
    const int64_t sp = (S + 15) / 16 * 16;                                                              \
    T *xt = work, *lg = xt + D * sp, *sm = lg + K * R * sp, *cc = sm + K * R * sp, *p = cc + K * R * S;  \
    T *q = p + K * R * D;                                                                               \
    T *y = q + K * R * D, *p0 = y + K * R * D, *run = p0 + R * D;                                       \
    for (int64_t b = b0; b < b1; b++) {                                                                 \
        const T *xb = x + b * S * D;                                                                    \
        const int64_t n = len[b] < S ? (len[b] > 0 ? len[b] : 0) : S;                                   \
        for (int64_t d = 0; d < D; d++) run[d] = 0;                                                     \
        for (int64_t t0 = 0; t0 < S; t0 += R) {                                                         \
            const int64_t t1 = t0 + R < S ? t0 + R : S, rb = t1 - t0, t1p = (t1 + 15) / 16 * 16;        \
            TRANSPOSE(xt, t1p, xb, D, t1, D);  /* X^T over the block's history, rows of t1p */           \
            for (int64_t d = 0; d < D; d++)                                                             \
                for (int64_t s = t1; s < t1p; s++) xt[d * t1p + s] = 0;                                 \
            for (int64_t r = 0; r < rb; r++) {  /* round 0: the running sum over the visible history */ \
                const int64_t t = t0 + r;                                                               \
                if (t < n) for (int64_t d = 0; d < D; d++) run[d] += xb[t * D + d];                      \
                for (int64_t d = 0; d < D; d++) p0[r * D + d] = run[d] * ((T)1 / (T)K);                  \
            }                                                                                           \
            for (int64_t it = 0; it + 1 < iters; it++) {                                                \
                if (it == 0) {                                                                          \
                    MM(q, p0, mcat, rb, D, K * D, 0, 1.0, 0);  /* (rb, K D): M_k p for every k */       \
                } else {                                                                                \
                    for (int64_t k = 0; k < K; k++) {                                                   \
                        MM(p + k * R * D, cc + k * R * t1, xb, rb, t1, D, 0, 1.0, 0);                    \
                        MM(q + k * R * D, p + k * R * D, mk + k * D * D, rb, D, D, 0, 1.0, 0);           \
                    }                                                                                   \
                }                                                                                       \
                for (int64_t k = 0; k < K; k++)                                                         \
                    for (int64_t r = 0; r < rb; r++) {  /* y = f(p . q) q */                            \
                        const T *pr = it == 0 ? p0 + r * D : p + (k * R + r) * D;                       \
                        const T *qr = it == 0 ? q + (r * K + k) * D : q + (k * R + r) * D;              \
                        T *yr = y + (k * R + r) * D, n2 = 0;                                            \
                        _Pragma("omp simd reduction(+:n2)")                                             \
                        for (int64_t d = 0; d < D; d++) n2 += pr[d] * qr[d];                            \
                        n2 = n2 > 0 ? n2 : 0;                                                           \
                        const T f = n2 / (1 + n2) / SQRT(n2 + (T)1e-9);                                 \
                        for (int64_t d = 0; d < D; d++) yr[d] = f * qr[d];                              \
                    }                                                                                   \
                for (int64_t k = 0; k < K; k++)  /* the logits' update */                               \
                    MM(lg + k * R * t1p, y + k * R * D, xt, rb, D, t1p, 0, 1.0, it > 0);                \
                for (int64_t r = 0; r < rb; r++) {  /* couplings: a softmax over the interests */       \
                    const int64_t t = t0 + r, nt = t + 1 < n ? t + 1 : n;                               \
                    softmax_over_k_##SUF(lg + r * t1p, sm + r * t1p, K, R * t1p, t1p);                  \
                    for (int64_t k = 0; k < K; k++)                                                     \
                        for (int64_t s = 0; s < t1; s++)                                                \
                            cc[(k * R + r) * t1 + s] = s < nt ? sm[(k * R + r) * t1p + s] : 0;          \
                }                                                                                       \
            }                                                                                           \
            for (int64_t r = 0; r < rb; r++) {  /* the last round's couplings out, (t, k, s) */         \
                const int64_t t = t0 + r, nt = t + 1 < n ? t + 1 : n;                                   \
                for (int64_t k = 0; k < K; k++) {                                                       \
                    T *ct = c + ((b * S + t) * K + k) * S;                                              \
                    for (int64_t s = 0; s < t1; s++)                                                    \
                        ct[s] = s >= nt ? 0 : iters > 1 ? cc[(k * R + r) * t1 + s] : (T)1 / (T)K;       \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
void benchbox_dr_route_causal_##SUF(const T *x, const T *mk, const T *mcat, const int64_t *len, T *c, T *work, \
        int64_t batch, int64_t S, int64_t K, int64_t D, int64_t iters, int64_t R, int64_t parts) {     \
    const int64_t per = benchbox_dr_route_causal_work(S, K, D, R);                                      \
    PARTS(dr_route_causal_range_##SUF(x, mk, mcat, len, c, work + p_ * per, b0, b1, S, K, D, iters, R)) \
}
DR_ROUTE_CAUSAL(double, f64, mm_f64, transpose_strided_f64, sqrt)
DR_ROUTE_CAUSAL(float, f32, mm_f32, transpose_strided_f32, sqrtf)
/* ComiRec-SA's causal interests (readouts._causal_softmax_pool): y[b, t, k] = sum_{s <= t} softmax_s(a[b, :t+1, k])
   h[b, s], the logits a (B, S, K) -inf at padding, position 0 visible. The logits do not depend on t: per (b, k) an
   online softmax over t, a running max m_t, denominator den_t and numerator vector, O(S D) where torch's blocked form
   makes several (B, S, K, D) passes (~35% of an ML-1M sequence step). m and den are kept; the backward runs the
   adjoint backwards in time under the same running shifts, each factor exp(m_s - m_{s+1}) <= 1:
   G_s = dy_s / den_s + exp(m_s - m_{s+1}) G_{s+1}, H_s = y_s . dy_s / den_s + exp(m_s - m_{s+1}) H_{s+1},
   dh_s = sum_k exp(a_s - m_s) G_s, da_s = exp(a_s - m_s) (h_s . G_s - H_s). Rows [b0, b1): the caller's threads
   split them; work: K D values a part. */
#define CAUSAL_POOL(T, SUF, EXP)                                                                        \
static void causal_pool_range_##SUF(const T *a, const T *h, T *y, T *m, T *den, T *num, int64_t b0, int64_t b1, \
                                    int64_t S, int64_t K, int64_t D) {                                  \
    for (int64_t b = b0; b < b1; b++) {                                                                 \
        for (int64_t i = 0; i < K * D; i++) num[i] = 0;                                                 \
        for (int64_t k = 0; k < K; k++) { m[b * S * K + k] = a[b * S * K + k]; den[b * S * K + k] = 0; } \
        for (int64_t t = 0; t < S; t++) {                                                               \
            const T *ht = h + (b * S + t) * D;                                                          \
            for (int64_t k = 0; k < K; k++) {                                                           \
                const int64_t i = (b * S + t) * K + k, ip = t ? i - K : i;                              \
                const T at = a[i], mp = m[ip];                                                          \
                T *nk = num + k * D, *yt = y + i * D, dn = t ? den[ip] : 0, mt = mp;                     \
                if (at > mp) {  /* a new max: rescale what was summed */                                \
                    const T sc = EXP(mp - at);                                                          \
                    for (int64_t d = 0; d < D; d++) nk[d] *= sc;                                        \
                    dn *= sc;                                                                           \
                    mt = at;                                                                            \
                }                                                                                       \
                const T e = EXP(at - mt);  /* 0 at padding */                                           \
                dn += e;                                                                                \
                const T inv = 1 / dn;                                                                   \
                for (int64_t d = 0; d < D; d++) { nk[d] += e * ht[d]; yt[d] = nk[d] * inv; }            \
                m[i] = mt;                                                                              \
                den[i] = dn;                                                                            \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
static void causal_pool_backward_range_##SUF(const T *dy, const T *a, const T *h, const T *y, const T *m,  \
        const T *den, T *da, T *dh, T *gk, int64_t b0, int64_t b1, int64_t S, int64_t K, int64_t D) {   \
    T hk[64];  /* H per interest (K <= 64) */                                                           \
    for (int64_t b = b0; b < b1; b++) {                                                                 \
        for (int64_t i = 0; i < K * D; i++) gk[i] = 0;                                                  \
        for (int64_t k = 0; k < K; k++) hk[k] = 0;                                                      \
        for (int64_t s = S - 1; s >= 0; s--) {                                                          \
            const T *hs = h + (b * S + s) * D;                                                          \
            T *dhs = dh + (b * S + s) * D;                                                              \
            for (int64_t d = 0; d < D; d++) dhs[d] = 0;                                                 \
            for (int64_t k = 0; k < K; k++) {                                                           \
                const int64_t i = (b * S + s) * K + k;                                                  \
                const T r = s + 1 < S ? EXP(m[i] - m[i + K]) : 0, inv = 1 / den[i];                     \
                const T *dys = dy + i * D, *ys = y + i * D;                                             \
                T *g = gk + k * D, yd = 0, hg = 0;                                                      \
                for (int64_t d = 0; d < D; d++) yd += ys[d] * dys[d];                                   \
                hk[k] = hk[k] * r + yd * inv;                                                           \
                for (int64_t d = 0; d < D; d++) { g[d] = g[d] * r + dys[d] * inv; hg += hs[d] * g[d]; }  \
                const T e = EXP(a[i] - m[i]);                                                           \
                for (int64_t d = 0; d < D; d++) dhs[d] += e * g[d];                                     \
                da[i] = e * (hg - hk[k]);                                                               \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
void benchbox_causal_pool_##SUF(const T *a, const T *h, T *y, T *m, T *den, T *work, int64_t batch, int64_t S, \
                                int64_t K, int64_t D, int64_t parts) {                                  \
    PARTS(causal_pool_range_##SUF(a, h, y, m, den, work + p_ * K * D, b0, b1, S, K, D))                 \
}                                                                                                       \
void benchbox_causal_pool_backward_##SUF(const T *dy, const T *a, const T *h, const T *y, const T *m,    \
        const T *den, T *da, T *dh, T *work, int64_t batch, int64_t S, int64_t K, int64_t D, int64_t parts) { \
    PARTS(causal_pool_backward_range_##SUF(dy, a, h, y, m, den, da, dh, work + p_ * K * D, b0, b1, S, K, D)) \
}
CAUSAL_POOL(double, f64, exp)
CAUSAL_POOL(float, f32, expf)
"""


def kernels_enabled(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(KERNELS_ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def build_library(file_name: str, source: str, flags: tuple[str, ...] = ("-O2",),
                  folder: Path | None = None) -> Path | None:
    """A shared library compiled from ``source`` into ``folder`` (default: the cache folder) with ``$CC``
    (default ``cc``), once; None where it cannot be (no compiler, an unwritable folder): callers then take
    their plain path. Put a version or a hash of the source in ``file_name``: an existing file is reused."""
    from .paths import cache_dir
    try:
        folder = Path(folder) if folder is not None else cache_dir()
        path = folder / file_name
        if path.exists():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
            src, out = Path(tmp) / "lib.c", Path(tmp) / file_name
            src.write_text(source)
            done = subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", str(out), str(src), *flags],
                                  capture_output=True, timeout=120)
            if done.returncode != 0 or not out.exists():
                return None
            os.replace(out, path)  # atomic: builders in parallel each rename a whole file
        return path
    except (OSError, subprocess.TimeoutExpired):
        return None


def lanes() -> int | None:
    """The float kernels' lane width in the built library (VL: 16, 8 or 4), or None without the library."""
    lib = _library()
    return None if lib is None else int(lib.benchbox_lanes())


def kernels_in_force() -> str:
    """What rows record as ``cpu_kernels``: ``c`` where this process runs the C kernels below (built, loaded),
    ``torch`` where torch's own paths run everywhere (turned off, not Linux, no compiler). The DIN and
    RMSNorm kernels sum in another order than torch's ops, so the two give results that differ by float
    rounding; the dropout and rows kernels are bit for bit either way."""
    return "c" if _library() is not None else "torch"


def _machine_tag() -> str:
    """The CPU's model and flags, hashed: a library built with -march=native runs only where it was built."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags")][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


@functools.cache
def _library():
    """The built library (ctypes), or None: turned off (BENCHBOX_C_KERNELS=off), not Linux, no compiler."""
    import platform
    if not kernels_enabled() or platform.system() != "Linux":
        return None
    import torch  # noqa: F401  (loaded first: its libgomp.so.1 is then the OpenMP runtime this library binds to)
    # -lm after the source: the double kernels' exp. -fopenmp for the threaded kernels (see PARTS); where it does not
    # build (a compiler without OpenMP), the same source without it: those kernels then run their parts in turn
    march = ("-march=" + (os.environ.get(MARCH_ENV, "").strip() or "native"),)
    lanes = os.environ.get(LANES_ENV, "").strip()
    march += (f"-DBENCHBOX_VL={int(lanes)}",) if lanes else ()
    for flags in (("-O3", *march, "-fopenmp", "-lm"), ("-O3", *march, "-lm")):
        tag = hashlib.sha256((_SOURCE + " ".join(flags) + _machine_tag()).encode()).hexdigest()[:12]
        path = build_library(f"libbenchbox_kernels-{tag}.so", _SOURCE, flags)
        if path is not None:
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                pass
    return None


@functools.cache
def _dropout_library():
    """The dropout kernel, or None (no library, or its self-check against torch failed)."""
    lib = _library()
    if lib is None:
        return None
    fn = lib.benchbox_dropout_noise
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_int]
    return fn if _agrees_with_torch(fn) else None


def _torch_noise(shape, keep: float, dtype, generator=None):
    """torch's own: bernoulli_(keep) in ``dtype``, divided by keep (what F.dropout multiplies by)."""
    import torch
    return torch.empty(shape, dtype=dtype).bernoulli_(keep, generator=generator).div_(keep)


@functools.cache
def _kept_value(dtype, keep: float) -> float:
    """1 / keep as torch's division rounds it in ``dtype`` (the noise's nonzero value)."""
    import torch
    return torch.ones((), dtype=dtype).div_(keep).item()


def _kernel_noise(fn, like, keep: float, generator):
    import torch
    out = torch.empty_like(like)  # like's strides (dense): torch draws in memory order, and so do we
    state = generator.get_state()
    if fn(state.data_ptr(), out.data_ptr(), out.numel(), keep, _kept_value(like.dtype, keep),
          int(like.dtype == torch.float64)) != 0:
        return None
    generator.set_state(state)
    return out


def _dense(t) -> bool:
    """Whether t's elements fill its storage span without gaps or overlap (any order of strides)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def _agrees_with_torch(fn) -> bool:
    """The kernel against torch's bernoulli_ on private generators: several sizes, starts inside the
    state array (after odd single draws) and across its regeneration, and the generators' states after."""
    import torch
    for seed, skip, n, dtype in ((7, 0, 1, torch.float32), (8, 3, 311, torch.float32), (9, 1, 1500, torch.float64),
                                 (10, 623, 4097, torch.float32)):
        g_torch, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for g in (g_torch, g_ours):
            torch.empty(skip).uniform_(generator=g)  # float32 uniform_: one 32-bit output each
        want = _torch_noise((n,), 0.8, dtype, g_torch)
        got = _kernel_noise(fn, torch.empty(n, dtype=dtype), 0.8, g_ours)
        if got is None or not torch.equal(got, want) or not torch.equal(g_torch.get_state(), g_ours.get_state()):
            return False
    return True


def dropout_noise(like, keep: float):
    """torch's CPU dropout noise for ``like`` (``empty_like(like).bernoulli_(keep) / keep``, drawn from the
    default generator in like's memory order) from the C kernel, bit for bit; None where the kernel is not
    available or does not apply (another device or dtype, a tensor with gaps): the caller draws it itself."""
    import torch
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64) or not _dense(like):
        return None
    fn = _dropout_library()
    if fn is None:
        return None
    return _kernel_noise(fn, like, keep, torch.default_generator)


def _per_dtype(stem: str, restype, argtypes) -> dict:
    """{torch dtype: the library's ``benchbox_<stem>_f32`` / ``_f64`` function, typed} (empty where no library)."""
    import torch
    lib = _library()
    if lib is None:
        return {}
    found = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        fn = getattr(lib, f"benchbox_{stem}_{tag}")
        fn.restype, fn.argtypes = restype, argtypes
        found[dtype] = fn
    return found


def _kernel_pair(forward: str, forward_args, backward: str, backward_args) -> dict:
    """{torch dtype: (forward, backward)}: a kernel's two library functions (``_per_dtype``'s stems), typed with
    their argument lists (void return); empty where no library."""
    fw, bw = _per_dtype(forward, None, forward_args), _per_dtype(backward, None, backward_args)
    return {dtype: (fw[dtype], bw[dtype]) for dtype in fw}


@functools.cache
def _rows_add_kernels():
    """{torch dtype: the rows-add kernel} that agree with torch's own (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return {dtype: fn for dtype, fn in _per_dtype("rows_add", ctypes.c_int, [p, i, i, p, i, p, i]).items()
            if _rows_add_agrees_with_torch(fn, dtype)}


def _rows_add_agrees_with_torch(fn, dtype) -> bool:
    """The kernel against torch's embedding_dense_backward (padding row skipped) and index_add_ into zeros,
    bit for bit, on repeated ids (one row summed from many contributions, in order)."""
    import torch
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 37, (2000,), generator=g)
    src = torch.randn(2000, 24, generator=g, dtype=dtype) * torch.logspace(-6, 6, 24, dtype=dtype)
    want_embedding = torch.ops.aten.embedding_dense_backward(src, ids, 37, 0, False)
    want_index_add = torch.zeros(37, 24, dtype=dtype).index_add_(0, ids, src)
    got = [_run_rows_add(fn, 37, ids, src, skip) for skip in (0, -1)]
    return all(x is not None for x in got) and torch.equal(got[0], want_embedding) and torch.equal(got[1], want_index_add)


def _run_rows_add(fn, n_out: int, ids, src, skip: int):
    import torch
    ids, src = ids.reshape(-1).contiguous(), src.reshape(ids.numel(), -1).contiguous()
    out = torch.empty(n_out, src.shape[1], dtype=src.dtype)  # zeroed by the kernel
    if fn(out.data_ptr(), n_out, src.shape[1], ids.data_ptr(), ids.numel(), src.data_ptr(), skip) != 0:
        return None
    return out


def rows_add(n_out: int, ids, src, skip: int = -1):
    """zeros(n_out, D) with src's rows added at ids (ids' shape + (D,)), in order, rows with id == skip
    left out: torch's CPU embedding_dense_backward (skip = padding_idx) and ``zeros.index_add_(0, ids, src)``
    (skip = -1), bit for bit, from the C kernel. None where it does not apply (another device, dtype or id
    type, no library, an id out of range): the caller runs torch's own."""
    import torch
    if src.device.type != "cpu" or ids.dtype != torch.int64 or ids.device.type != "cpu":
        return None
    fn = _rows_add_kernels().get(src.dtype)
    return None if fn is None else _run_rows_add(fn, n_out, ids, src, skip)


@functools.cache
def _din_kernels():
    """{torch dtype: (relu_matvec, threshold_sums, tcr_sums)} (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    relu_matvec = _per_dtype("din_relu_matvec", None, [p, p, p, i, i, i])
    sums = _per_dtype("din_threshold_sums", None, [p, p, p, p, p, i, i, i, i])
    tcr_sums = _per_dtype("din_tcr_sums", None, [p, p, p, p, p, i, i, i])
    return {dtype: (relu_matvec[dtype], sums[dtype], tcr_sums[dtype]) for dtype in relu_matvec}


def _din_applies(*tensors) -> bool:
    return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and tensors[0].dtype in _din_kernels() and all(t.dtype == tensors[0].dtype for t in tensors))


def din_relu_matvec(z, w, y) -> bool:
    """z (M, H, S) := max(z, 0) in place and y (M, S) += w (H) . z over H, in one pass; False (nothing done)
    where the kernel does not apply (the caller runs relu_ and its matrix-vector product)."""
    if not _din_applies(z, w, y):
        return False
    m, hid, s = z.shape
    _din_kernels()[z.dtype][0](z.data_ptr(), w.data_ptr(), y.data_ptr(), m, hid, s)
    return True


def din_threshold_sums(z, gy):
    """For z (B, N, H, S) and gy (B, N, S): tb = gy [z > 0] (B, N, H, S), its sum over S (B, N, H) and over
    N (B, H, S), in one pass; None where the kernel does not apply."""
    import torch
    if not _din_applies(z, gy):
        return None
    b, n, hid, s = z.shape
    tb, tb_s, tb_n = torch.empty_like(z), z.new_empty(b, n, hid), z.new_empty(b, hid, s)
    _din_kernels()[z.dtype][1](z.data_ptr(), gy.data_ptr(), tb.data_ptr(), tb_s.data_ptr(), tb_n.data_ptr(),
                               b, n, hid, s)
    return tb, tb_s, tb_n


def din_tcr_sums(tcr, r1, cand):
    """For tcr (B, N, H, D), r1 (H, D) and cand (B, N, D): (sum_h tcr r1 (B, N, D), sum_{b,n} tcr cand (H, D)),
    in one read of tcr; None where the kernel does not apply."""
    if not _din_applies(tcr, r1, cand):
        return None
    b, n, hid, d = tcr.shape
    out_bn, out_hd = cand.new_empty(b, n, d), cand.new_empty(hid, d)
    _din_kernels()[tcr.dtype][2](tcr.data_ptr(), r1.data_ptr(), cand.data_ptr(), out_bn.data_ptr(),
                                 out_hd.data_ptr(), b * n, hid, d)
    return out_bn, out_hd


@functools.cache
def _rmsnorm_kernels():
    """{torch dtype: RMSNorm's backward kernel} (empty where no library)."""
    return _per_dtype("rmsnorm_backward", None, [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2)


def rmsnorm_backward(g, xhat, rstd, weight):
    """RMSNorm's (gx, g_weight) from the incoming gradient g, xhat = x rstd and rstd (rows' shape + (1,)), in
    one pass; None where the kernel does not apply."""
    import torch
    if not (g.device.type == "cpu" and g.dtype == xhat.dtype == rstd.dtype == weight.dtype
            and g.dtype in _rmsnorm_kernels()):
        return None
    g, xhat, rstd, weight = g.contiguous(), xhat.contiguous(), rstd.contiguous(), weight.contiguous()
    d = xhat.shape[-1]
    gx, g_weight = torch.empty_like(xhat), weight.new_empty(d)
    _rmsnorm_kernels()[g.dtype](g.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), weight.data_ptr(), gx.data_ptr(),
                                g_weight.data_ptr(), xhat.numel() // d, d)
    return gx, g_weight



@functools.cache
def _sigmoid_project_kernels():
    """{torch dtype: (forward, backward)} of ComiRec-SA's sigmoid + rank-K product (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _kernel_pair("sigmoid_project", [p] * 4 + [i] * 3, "sigmoid_project_backward", [p] * 6 + [i] * 3)


def sigmoid_project_applies(u, w) -> bool:
    """Whether ``sigmoid_project`` runs for u (..., hd) and w (k, hd): CPU, one float dtype with a kernel,
    and for float32 hd a multiple of 16 (the kernel's vector width)."""
    import torch
    return (u.device.type == "cpu" and w.device.type == "cpu" and u.dtype == w.dtype
            and u.dtype in _sigmoid_project_kernels() and w.dim() == 2 and u.shape[-1] == w.shape[1]
            and (u.dtype != torch.float32 or u.shape[-1] % 16 == 0))


def sigmoid_project(u, w):
    """(s, a) with s = sigmoid(u) and a = s @ w.T ((..., k)), in one pass over u. The caller checks
    ``sigmoid_project_applies`` first."""
    import torch
    u, w = u.contiguous(), w.contiguous()
    k, hd = w.shape
    s, a = torch.empty_like(u), u.new_empty(*u.shape[:-1], k)
    _sigmoid_project_kernels()[u.dtype][0](u.data_ptr(), w.data_ptr(), s.data_ptr(), a.data_ptr(),
                                          u.numel() // hd, hd, k)
    return s, a


def sigmoid_project_backward(ga, s, w):
    """(gu, gw) of ``sigmoid_project``'s a, from its gradient ga (..., k): gu = (ga @ w) s (1 - s),
    gw = ga^T s, in one pass over s."""
    import torch
    ga, s, w = ga.contiguous(), s.contiguous(), w.contiguous()
    k, hd = w.shape
    gu, gw, part = torch.empty_like(s), w.new_empty(k, hd), w.new_empty(k, hd)
    _sigmoid_project_kernels()[s.dtype][1](ga.data_ptr(), s.data_ptr(), w.data_ptr(), gu.data_ptr(),
                                          gw.data_ptr(), part.data_ptr(), s.numel() // hd, hd, k)
    return gu, gw


@functools.cache
def _gelu_kernels():
    """{torch dtype: the erf-GELU kernel} (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _per_dtype("gelu", None, [p, p, p, i, i])


# elements a thread: below twice this the GELU kernel runs on one thread (torch's own grain is 32,768)
GELU_GRAIN = 32768


def gelu_applies(x) -> bool:
    """Whether ``gelu`` runs for x: CPU, a float dtype with a kernel."""
    return x.device.type == "cpu" and x.dtype in _gelu_kernels()


def gelu(x, derivative: bool):
    """(x Phi(x), and Phi(x) + x phi(x) where ``derivative`` else None): the exact (erf) GELU and its derivative, in
    one pass; the caller checks ``gelu_applies`` first."""
    import torch
    x = x.contiguous()
    y, d = torch.empty_like(x), torch.empty_like(x) if derivative else None
    _gelu_kernels()[x.dtype](x.data_ptr(), y.data_ptr(), d.data_ptr() if derivative else None, x.numel(),
                             _parts(x.numel() // GELU_GRAIN))
    return y, d


@functools.cache
def _pool_score_kernels():
    """{torch dtype: (forward, backward)} of ComiRec-SA's interests and scores at a row's end (empty where no
    library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _kernel_pair("pool_score", [p] * 8 + [i] * 5, "pool_score_backward", [p] * 12 + [i] * 5)


def pool_score_applies(h, cand) -> bool:
    """Whether ``pool_score`` runs for features h (B, S, D) (the logits have h's dtype) and candidates cand (B, C, D):
    CPU, one dtype with a kernel."""
    return (h.device.type == "cpu" and h.dtype == cand.dtype and h.dtype in _pool_score_kernels()
            and h.dim() == cand.dim() == 3)


def pool_score(a, h, cand, lengths):
    """(out (B, C), saved): out[b, c] = max_k cand[b, c] . v[b, k], v = softmax_s(a[b, :len_b]) pooled over h; saved
    is what ``pool_score_backward`` reads. Every length must be at least 1."""
    import torch
    a, h, cand = a.contiguous(), h.contiguous(), cand.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    (B, S, K), D, C = a.shape, h.shape[2], cand.shape[1]
    att, v, sc, out = a.new_empty(B, S, K), a.new_empty(B, K, D), a.new_empty(B, C, K), a.new_empty(B, C)
    _pool_score_kernels()[a.dtype][0](a.data_ptr(), h.data_ptr(), cand.data_ptr(), lengths.data_ptr(), att.data_ptr(),
                                      v.data_ptr(), sc.data_ptr(), out.data_ptr(), B, S, K, D, C)
    return out, (h, cand, lengths, att, v, sc, out)


def pool_score_backward(g, saved):
    """(da, dh, dcand) of ``pool_score``'s out, from its gradient g (B, C)."""
    h, cand, lengths, att, v, sc, out = saved
    g = g.contiguous()
    (B, S, K), D, C = att.shape, h.shape[2], cand.shape[1]
    da, dh, dcand = att.new_empty(B, S, K), h.new_empty(B, S, D), cand.new_empty(B, C, D)
    work = h.new_empty(K * D + S * K)  # one row's dv and datt
    _pool_score_kernels()[att.dtype][1](g.data_ptr(), h.data_ptr(), cand.data_ptr(), lengths.data_ptr(), att.data_ptr(),
                                        v.data_ptr(), sc.data_ptr(), out.data_ptr(), da.data_ptr(), dh.data_ptr(),
                                        dcand.data_ptr(), work.data_ptr(), B, S, K, D, C)
    return da, dh, dcand


@functools.cache
def _dr_route_causal_kernels():
    """{torch dtype: ComiRec-DR's causal routing rounds} (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib = _library()
    if lib is not None:
        lib.benchbox_dr_route_causal_work.restype = i
        lib.benchbox_dr_route_causal_work.argtypes = [i, i, i, i]
    return _per_dtype("dr_route_causal", None, [p] * 6 + [i] * 7)


def dr_route_causal_applies(x, w) -> bool:
    """Whether ``dr_route_causal`` runs for features x (B, S, D) and shared maps w (K, D, D): CPU, one dtype with a
    kernel, and for float32 a width that is a multiple of 16."""
    import torch
    return (x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in _dr_route_causal_kernels() and x.dim() == 3
            and w.dim() == 3 and w.shape[1] == w.shape[2] == x.shape[2]
            and (x.dtype != torch.float32 or x.shape[2] % 16 == 0))


def dr_route_causal(x, w, lengths, iters: int, block: int):
    """The last round's couplings c (B, S, K, S) of ComiRec-DR's causal routing with the shared maps w (K, D, D) over
    x (B, S, D), in target blocks of ``block``: written at s below each target's block end (what
    readouts._BlockCausalPoolShared reads), zero where s is not visible; no gradient."""
    import torch
    fn = _dr_route_causal_kernels()[x.dtype]  # first: it also types the work-size function
    x, w = x.detach().contiguous(), w.detach().contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    (B, S, D), K = x.shape, w.shape[0]
    mk = (w.transpose(1, 2) @ w).contiguous()  # M_k = W_k^T W_k, symmetric
    mcat = mk.transpose(0, 1).reshape(D, K * D).contiguous()
    c = x.new_empty(B, S, K, S)
    parts = _parts(B)
    work = x.new_empty(parts * _library().benchbox_dr_route_causal_work(S, K, D, block))
    fn(x.data_ptr(), mk.data_ptr(), mcat.data_ptr(), lengths.data_ptr(), c.data_ptr(), work.data_ptr(), B, S, K, D,
       iters, block, parts)
    return c


@functools.cache
def _causal_pool_kernels():
    """{torch dtype: (forward, backward)} of ComiRec-SA's causal softmax pool (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _kernel_pair("causal_pool", [p] * 6 + [i] * 5, "causal_pool_backward", [p] * 9 + [i] * 5)


def causal_pool_applies(a, h) -> bool:
    """Whether ``causal_pool`` runs for logits a (B, S, K) and features h (B, S, D): CPU, one dtype with a kernel, at
    most 64 interests."""
    return (a.device.type == "cpu" and h.device == a.device and a.dtype == h.dtype and a.dtype in _causal_pool_kernels()
            and a.dim() == h.dim() == 3 and a.shape[:2] == h.shape[:2] and a.shape[2] <= 64)


def causal_pool(a, h):
    """(y (B, S, K, D), saved): y[b, t, k] = sum_{s <= t} softmax_s(a[b, :t+1, k]) h[b, s] by an online softmax over t;
    saved is what ``causal_pool_backward`` reads. a[:, 0] must be finite."""
    a, h = a.contiguous(), h.contiguous()
    (B, S, K), D = a.shape, h.shape[2]
    y, m, den = h.new_empty(B, S, K, D), a.new_empty(B, S, K), a.new_empty(B, S, K)
    parts = _parts(B)
    work = h.new_empty(parts * K * D)
    _causal_pool_kernels()[a.dtype][0](a.data_ptr(), h.data_ptr(), y.data_ptr(), m.data_ptr(), den.data_ptr(),
                                       work.data_ptr(), B, S, K, D, parts)
    return y, (a, h, y, m, den)


def causal_pool_backward(dy, saved):
    """(da, dh) of ``causal_pool``'s y from its gradient dy (B, S, K, D)."""
    a, h, y, m, den = saved
    dy = dy.contiguous()
    (B, S, K), D = a.shape, h.shape[2]
    da, dh = a.new_empty(B, S, K), h.new_empty(B, S, D)
    parts = _parts(B)
    work = h.new_empty(parts * K * D)
    _causal_pool_kernels()[a.dtype][1](dy.data_ptr(), a.data_ptr(), h.data_ptr(), y.data_ptr(), m.data_ptr(),
                                       den.data_ptr(), da.data_ptr(), dh.data_ptr(), work.data_ptr(), B, S, K, D, parts)
    return da, dh


@functools.cache
def _cand_dot_kernels():
    """{torch dtype: (forward, backward)} of candidate_dot for few candidates a row (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _kernel_pair("cand_dot", [p, p, p, i, i, i, i], "cand_dot_backward", [p, p, p, p, p, i, i, i, i])


# rows a thread: below twice this candidate_dot runs on one thread
CAND_DOT_GRAIN = 4096


def cand_dot_applies(cand, f) -> bool:
    """Whether ``cand_dot`` runs for candidates cand (..., C, D) and features f (..., D) of the same leading shape:
    CPU, one dtype with a kernel."""
    return (cand.device.type == "cpu" and f.device == cand.device and cand.dtype == f.dtype
            and cand.dtype in _cand_dot_kernels() and cand.dim() >= 2 and f.shape == cand.shape[:-2] + cand.shape[-1:])


def cand_dot(cand, f):
    """out (..., C) = cand (..., C, D) . f (..., D), one pass; the caller checks ``cand_dot_applies`` first."""
    cand, f = cand.contiguous(), f.contiguous()
    C, D = cand.shape[-2], cand.shape[-1]
    rows = f.numel() // D if D else 0
    out = cand.new_empty(cand.shape[:-1])
    _cand_dot_kernels()[cand.dtype][0](cand.data_ptr(), f.data_ptr(), out.data_ptr(), rows, C, D,
                                       _parts(rows // CAND_DOT_GRAIN))
    return out


def cand_dot_backward(g, cand, f, need_cand: bool = True, need_f: bool = True):
    """(dcand, df) of ``cand_dot``'s out from its gradient g (..., C): g f and sum_c g cand (None where not needed)."""
    import torch
    g, cand, f = g.contiguous(), cand.contiguous(), f.contiguous()
    C, D = cand.shape[-2], cand.shape[-1]
    rows = f.numel() // D if D else 0
    dcand = torch.empty_like(cand) if need_cand else None
    df = torch.empty_like(f) if need_f else None
    _cand_dot_kernels()[cand.dtype][1](g.data_ptr(), cand.data_ptr(), f.data_ptr(),
                                       dcand.data_ptr() if need_cand else None, df.data_ptr() if need_f else None,
                                       rows, C, D, _parts(rows // CAND_DOT_GRAIN))
    return dcand, df


@functools.cache
def _dr_score_kernels():
    """{torch dtype: (forward, backward)} of ComiRec-DR's routing and scores at a row's end (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _kernel_pair("dr_score", [p] * 12 + [i] * 8, "dr_score_backward", [p] * 15 + [i] * 7)


# rows a block of the routing kernel: each interest's maps are one product of the block's rows by W_k
DR_ROW_BLOCK = 32


def dr_score_applies(x, w, cand) -> bool:
    """Whether ``dr_score`` runs for features x (B, S, D), shared maps w (K, D, D) and candidates cand (B, C, D): CPU,
    one dtype with a kernel, and for float32 a width that is a multiple of 16 (the products' vector width)."""
    import torch
    return (x.device.type == "cpu" and x.dtype == w.dtype == cand.dtype and x.dtype in _dr_score_kernels()
            and x.dim() == cand.dim() == 3 and w.dim() == 3 and w.shape[1] == w.shape[2] == x.shape[2] == cand.shape[2]
            and (x.dtype != torch.float32 or x.shape[2] % 16 == 0))


def dr_score(x, w, lengths, cand, iters: int):
    """(out (B, C), saved): out[b, c] = max_k cand[b, c] . v[b, k], v ComiRec-DR's interests routed over x[b, :len_b]
    with the shared maps w (K, D, D) in ``iters`` rounds; saved is what ``dr_score_backward`` reads."""
    import torch
    x, w, cand = x.contiguous(), w.contiguous(), cand.contiguous()
    wt = w.transpose(1, 2).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    (B, S, D), K, C = x.shape, w.shape[0], cand.shape[1]
    c, p, z, v = x.new_empty(B, K, S), x.new_empty(K, B, D), x.new_empty(K, B, D), x.new_empty(K, B, D)
    sc, out = x.new_empty(B, C, K), x.new_empty(B, C)
    work = x.new_empty(K * D * D + DR_ROW_BLOCK * K * (D + S))
    _dr_score_kernels()[x.dtype][0](x.data_ptr(), w.data_ptr(), wt.data_ptr(), lengths.data_ptr(), cand.data_ptr(),
                                    c.data_ptr(), p.data_ptr(), z.data_ptr(), v.data_ptr(), sc.data_ptr(),
                                    out.data_ptr(), work.data_ptr(), B, S, K, D, D, C, iters, DR_ROW_BLOCK)
    return out, (x, w, lengths, cand, c, p, z, v, sc, out)


def dr_score_backward(g, saved):
    """(dx, dw, dcand) of ``dr_score``'s out, from its gradient g (B, C)."""
    x, w, lengths, cand, c, p, z, v, sc, out = saved
    g = g.contiguous()
    (B, S, D), K, C = x.shape, w.shape[0], cand.shape[1]
    dx, dw, dcand = x.new_empty(B, S, D), w.new_zeros(K, D, D), cand.new_empty(B, C, D)
    work = x.new_empty(3 * DR_ROW_BLOCK * K * D)
    _dr_score_kernels()[x.dtype][1](g.data_ptr(), x.data_ptr(), w.data_ptr(), lengths.data_ptr(), cand.data_ptr(),
                                    c.data_ptr(), p.data_ptr(), z.data_ptr(), v.data_ptr(), sc.data_ptr(),
                                    out.data_ptr(), dx.data_ptr(), dw.data_ptr(), dcand.data_ptr(), work.data_ptr(),
                                    B, S, K, D, D, C, DR_ROW_BLOCK)
    return dx, dw, dcand


@functools.cache
def _gru_kernels():
    """{torch dtype: (cell, cell_backward)} (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _kernel_pair("gru_cell", [p, i, p, p, i, p, i, p, p, p, p, i, i],
                        "gru_cell_backward", [p, p, i, p, p, p, p, p, i, p, i, p, p, i, i])


def gru_applies(x, hidden: int) -> bool:
    """Whether ``gru_cell`` runs for inputs like x: CPU, a float dtype with a kernel, and for float32 a hidden
    size that is a multiple of 16 (the kernel's vector width)."""
    import torch
    return (x.device.type == "cpu" and x.dtype in _gru_kernels()
            and (x.dtype != torch.float32 or hidden % 16 == 0))


def gru_functions(dtype):
    """(cell, cell_backward) for dtype: the C functions themselves, called with data pointers (ints) and strides
    in elements, from a loop over time steps where making tensor views per step would cost more than the
    kernels (mixers.gru._GRUSequence).

    cell(gi, gi_stride, gh, h, h_stride, h_out, out_stride, r, z, n, ghn, rows, hid): one step's gates into
    h_out, r, z, n, ghn from gi (rows, 3 hid), gh (rows, 3 hid, contiguous) and h (0: zeros).
    cell_backward(dh, h, h_stride, r, z, n, ghn, gy_prev, gy_stride, dgi, dgi_stride, dgh, dh_prev, rows, hid):
    its gate gradients into dgi and dgh, and z dh + gy_prev (0: none) into dh_prev."""
    return _gru_kernels()[dtype]


@functools.cache
def _attention_kernels():
    """{torch dtype: (forward, backward)} of the small causal attention (empty where no library)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    return _kernel_pair("small_attention", [p, i, i, p, p, i, i, p, p, p, i, i, i, i, i, f],
                        "small_attention_backward", [p, i, i, p, p, i, i] + [p] * 7 + [i] * 5 + [f])


def attention_functions(dtype):
    """(forward, backward) of the small causal attention for dtype, called with data pointers and strides in
    elements (mixers.attention._SmallAttention); None where there is no kernel for dtype."""
    return _attention_kernels().get(dtype)


@functools.cache
def _rmsnorm_forward_kernels():
    """{torch dtype: RMSNorm's forward kernel} (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    return _per_dtype("rmsnorm_forward", None, [p, p, p, p, p, i, i, ctypes.c_double])


def rmsnorm_forward(x, weight, eps: float):
    """RMSNorm's (y, xhat, rstd) (rstd with the rows' shape + (1,)) in one pass; None where the kernel does not
    apply (another device or dtype, float32 rows off the 16 lanes)."""
    import torch
    d = x.shape[-1]
    if not (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in _rmsnorm_forward_kernels()
            and (x.dtype != torch.float32 or d % 16 == 0)):
        return None
    x, weight = x.contiguous(), weight.contiguous()
    xhat, y, rstd = torch.empty_like(x), torch.empty_like(x), x.new_empty(*x.shape[:-1], 1)
    _rmsnorm_forward_kernels()[x.dtype](x.data_ptr(), weight.data_ptr(), xhat.data_ptr(), rstd.data_ptr(),
                                        y.data_ptr(), x.numel() // d, d, float(eps))
    return y, xhat, rstd


@functools.cache
def _ttt_kernels():
    """{torch dtype: (dual forward, dual backward, lnl2 forward, lnl2 vjp)}: TTT-Linear's one-mini-batch dual form
    and its inner loss gradient alone (empty where no library)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    found = [_per_dtype("ttt_dual_forward", None, [p] * 10 + [i, i, i, f]),
             _per_dtype("ttt_dual_backward", None, [p] * 12 + [i, i, i]),
             _per_dtype("lnl2_forward", None, [p] * 8 + [i, i, i, f]),
             _per_dtype("lnl2_vjp", None, [p] * 10 + [i, i, i])]
    return {dtype: tuple(fns[dtype] for fns in found) for dtype in found[0]}


def ttt_dual_applies(x) -> bool:
    """Whether the TTT dual-form kernels run for rows like x (..., D): CPU, a dtype with a kernel, and for
    float32 D a multiple of 16 up to 64."""
    import torch
    d = x.shape[-1]
    return (x.device.type == "cpu" and x.dtype in _ttt_kernels()
            and (x.dtype != torch.float32 or (d % 16 == 0 and d <= 64)))


def ttt_dual_forward(zk, gam2, gt, p, zq, eps: float):
    """For blocks (BH, S, D): what G's backward reads (xh, rstd (BH, S, 1), gxl) and G of zk, and zq -= P G in place
    (zq contiguous); all contiguous (BH, S, .) tensors. The rows' means are the kernel's scratch."""
    import torch
    bh, s, d = zk.shape
    zk, gam2, gt, p = (t.contiguous() for t in (zk, gam2, gt, p))
    xh, gxl, g = torch.empty_like(zk), torch.empty_like(zk), torch.empty_like(zk)
    mean, rstd = zk.new_empty(bh, s, 1), zk.new_empty(bh, s, 1)
    _ttt_kernels()[zk.dtype][0](zk.data_ptr(), gam2.data_ptr(), gt.data_ptr(), p.data_ptr(), zq.data_ptr(),
                                xh.data_ptr(), mean.data_ptr(), rstd.data_ptr(), gxl.data_ptr(), g.data_ptr(),
                                bh, s, d, float(eps))
    return xh, rstd, gxl, g


def ttt_dual_backward(dz, p, g, xh, rstd, gxl, gam2, dp, dgt):
    """From dZq (BH, S, D): dP into dp (BH, S, S), dgt = -dgxl into dgt (contiguous), and (dZk, dgam2 (BH, 1, D))."""
    import torch
    bh, s, d = dz.shape
    dz = dz.contiguous()
    dzk, dgam2, scratch = torch.empty_like(dz), dz.new_empty(bh, 1, d), dz.new_empty(2 * s * d)
    _ttt_kernels()[dz.dtype][1](dz.data_ptr(), p.data_ptr(), g.data_ptr(), xh.data_ptr(), rstd.data_ptr(),
                                gxl.data_ptr(), gam2.data_ptr(), dp.data_ptr(), dzk.data_ptr(), dgt.data_ptr(),
                                dgam2.data_ptr(), scratch.data_ptr(), bh, s, d)
    return dzk, dgam2


def lnl2_forward(z, gam2, gt, eps: float):
    """G = ln_l2_grad(z) with what its VJP reads: (G, xh, rstd, gxl) for contiguous z and gt of one shape and gam2
    (one row of D for every ``z.numel() // gam2.numel()`` rows of z, in order). The caller checks
    ``ttt_dual_applies`` and the shapes."""
    import torch
    d = z.shape[-1]
    rows = z.numel() // d
    xh, gxl, g = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    mean, rstd = z.new_empty(rows), z.new_empty(rows)
    _ttt_kernels()[z.dtype][2](z.data_ptr(), gam2.data_ptr(), gt.data_ptr(), xh.data_ptr(), mean.data_ptr(),
                               rstd.data_ptr(), gxl.data_ptr(), g.data_ptr(), rows, d, rows // (gam2.numel() // d),
                               float(eps))
    return g, xh, rstd, gxl


def lnl2_vjp(a, g, xh, rstd, gxl, gam2):
    """G's VJP from the upstream a (contiguous, z's shape): (dz, dgt, dgam2 (gam2's shape))."""
    import torch
    d = a.shape[-1]
    rows = a.numel() // d
    dz, dgt, dgam2, scratch = torch.empty_like(a), torch.empty_like(a), torch.empty_like(gam2), a.new_empty(d)
    _ttt_kernels()[a.dtype][3](a.data_ptr(), g.data_ptr(), xh.data_ptr(), rstd.data_ptr(), gxl.data_ptr(),
                               gam2.data_ptr(), dz.data_ptr(), dgt.data_ptr(), dgam2.data_ptr(), scratch.data_ptr(),
                               rows, d, rows // (gam2.numel() // d))
    return dz, dgt, dgam2


@functools.cache
def _scan_kernels():
    """{torch dtype: (scan, scan backward, conv, conv backward)}: Mamba's selective scan and its causal depthwise
    conv with SiLU (empty where no library)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    found = [_per_dtype("selective_scan", None, [p] * 5 + [i, i, p, i, i] + [p] * 6 + [i] * 6),
             _per_dtype("selective_scan_backward", None, [p] * 5 + [i, i, p, i, i] + [p] * 14 + [i] * 6),
             _per_dtype("conv_silu", None, [p, i, i, p, p, p] + [i] * 5),
             _per_dtype("conv_silu_backward", None, [p, i, i] + [p] * 7 + [i] * 5)]
    return {dtype: tuple(fns[dtype] for fns in found) for dtype in found[0]}


SCAN_CHECKPOINT = 16  # steps between the states the forward keeps for the backward (its recompute chunk)
SCAN_MAX_STATE = 64  # d_state: the kernel's per-state accumulators live on the stack


def selective_scan_applies(u, d_state: int) -> bool:
    """Whether the scan and conv kernels run for u (B, L, D): CPU, a dtype with a kernel, d_state <= 64 and for
    float32 D a multiple of 16 (the lanes run over D)."""
    import torch
    return (u.device.type == "cpu" and u.dtype in _scan_kernels() and 1 <= d_state <= SCAN_MAX_STATE
            and (u.dtype != torch.float32 or u.shape[-1] % 16 == 0))


def _parts(batch: int) -> int:
    """How many ranges the threaded kernels cut a batch into: torch's thread count (at most 8 and the batch)."""
    import torch
    return max(1, min(torch.get_num_threads(), batch, 8))


def _rows(t):
    """(pointer, batch stride, time stride) of a (B, L, X) tensor with unit steps over X (made so if not)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def _bc(bm, cm):
    """B and C with the same row strides (slices of one projection are) and unit steps over N."""
    if bm.stride() != cm.stride() or bm.stride(-1) != 1:
        bm, cm = bm.contiguous(), cm.contiguous()
    return bm, cm, bm.stride(0), bm.stride(1)


def selective_scan_forward(u, dt, at, bm, cm, z, dskip, h0):
    """(y, ys, the last state (B, N, D), checkpoints): y = (C . h + D u) silu(z) (B, L, D) with ys the same before
    the gate (None without z), for contiguous u, dt (B, L, D), at = A^T (N, D) contiguous, bm and cm (B, L, N), z
    (B, L, D) or None, dskip (D,) or None, h0 (B, N, D) contiguous or None."""
    import torch
    batch, length, d = u.shape
    n = at.shape[0]
    k = SCAN_CHECKPOINT
    bm, cm, bc_sb, bc_st = _bc(bm, cm)
    z, z_sb, z_st = _rows(z) if z is not None else (None, 0, 0)
    y, hlast = torch.empty_like(u), u.new_empty(batch, n, d)
    ys = torch.empty_like(u) if z is not None else None
    ck = u.new_empty(batch, (length + k - 1) // k, n, d)
    ptr = (lambda t: 0 if t is None else t.data_ptr())
    args = (u.data_ptr(), dt.data_ptr(), at.data_ptr(), bm.data_ptr(), cm.data_ptr(), bc_sb, bc_st, ptr(z), z_sb,
            z_st, ptr(dskip), ptr(h0), y.data_ptr(), ptr(ys), hlast.data_ptr(), ck.data_ptr())
    _scan_kernels()[u.dtype][0](*args, batch, _parts(batch), length, d, n, k)
    return y, ys, hlast, ck


def selective_scan_backward(u, dt, at, bm, cm, z, dskip, ys, ck, dy, dhlast):
    """(du, ddt, dA^T (N, D), dB, dC (B, L, N), dz (or None), dD (or None), dh0 (B, N, D)) from dy (B, L, D) and
    dhlast (B, N, D) or None, given the forward's inputs, ys and checkpoints."""
    import torch
    batch, length, d = u.shape
    n = at.shape[0]
    k = SCAN_CHECKPOINT
    bm, cm, bc_sb, bc_st = _bc(bm, cm)
    z, z_sb, z_st = _rows(z) if z is not None else (None, 0, 0)
    dy = dy.contiguous()
    dhlast = None if dhlast is None else dhlast.contiguous()
    du, ddt = torch.empty_like(u), torch.empty_like(u)
    dbm, dcm = u.new_empty(batch, length, n), u.new_empty(batch, length, n)
    dz = torch.empty_like(u) if z is not None else None
    dh0 = u.new_empty(batch, n, d)
    parts = _parts(batch)
    dat, ddskip = u.new_zeros(parts, n, d), u.new_zeros(parts, d)  # each part's own sums and work space
    work = u.new_empty(parts, (2 * k + 1) * n * d)
    ptr = (lambda t: 0 if t is None else t.data_ptr())
    args = (u.data_ptr(), dt.data_ptr(), at.data_ptr(), bm.data_ptr(), cm.data_ptr(), bc_sb, bc_st, ptr(z), z_sb,
            z_st, ptr(dskip), ptr(ys), dy.data_ptr(), ptr(dhlast), ck.data_ptr(), du.data_ptr(), ddt.data_ptr(),
            dbm.data_ptr(), dcm.data_ptr(), ptr(dz))
    _scan_kernels()[u.dtype][1](*args, dat.data_ptr(), ddskip.data_ptr(), dh0.data_ptr(), work.data_ptr(), batch,
                                parts, length, d, n, k)
    return du, ddt, dat.sum(0), dbm, dcm, dz, (ddskip.sum(0) if dskip is not None else None), dh0


def conv_silu_forward(x, wt, bias):
    """silu(causal depthwise conv) of x (B, L, D) (unit steps over D) with wt (K, D) and bias (D,) contiguous."""
    import torch
    batch, length, d = x.shape
    x, x_sb, x_st = _rows(x)
    out = x.new_empty(batch, length, d)
    _scan_kernels()[x.dtype][2](x.data_ptr(), x_sb, x_st, wt.data_ptr(), bias.data_ptr(), out.data_ptr(), batch,
                                _parts(batch), length, d, wt.shape[0])
    return out


def conv_silu_backward(x, wt, bias, dout):
    """(dx (B, L, D), dwt (K, D), dbias (D,)) of conv_silu_forward from dout (B, L, D)."""
    import torch
    batch, length, d = x.shape
    x, x_sb, x_st = _rows(x)
    dout = dout.contiguous()
    dx = x.new_empty(batch, length, d)
    parts = _parts(batch)
    dwt, dbias, pre = x.new_zeros(parts, *wt.shape), x.new_zeros(parts, d), x.new_empty(parts, length * d)
    _scan_kernels()[x.dtype][3](x.data_ptr(), x_sb, x_st, wt.data_ptr(), bias.data_ptr(), dout.data_ptr(),
                                dx.data_ptr(), dwt.data_ptr(), dbias.data_ptr(), pre.data_ptr(), batch, parts, length,
                                d,
                                wt.shape[0])
    return dx, dwt.sum(0), dbias.sum(0)


@functools.cache
def _ttt_window_kernels():
    """{torch dtype: (forward, backward)} of TTT-Linear's whole layer over its scan's chunks (empty where no
    library)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    return _kernel_pair("ttt_window_forward", [p, i] + [p] * 7 + [f, p, p] + [i] * 7 + [f],
                        "ttt_window_backward", [p, i, p, p, p, f] + [p] * 9 + [i] * 7)


TTT_WINDOW_MAX = 64  # a chunk's positions and the head size: the kernels' per-chunk arrays live on the stack


def ttt_window_applies(x, head_dim: int, chunk: int) -> bool:
    """Whether the TTT-Linear window kernels run for x (B, L, C) scanned in chunks of ``chunk`` positions: CPU, a
    dtype with a kernel, chunks and the head size at most 64, and for float32 a head size that is a multiple of 16
    (the caller picks the chunks as the torch scan does)."""
    import torch
    return (x.device.type == "cpu" and x.dtype in _ttt_window_kernels() and 0 < chunk <= TTT_WINDOW_MAX
            and head_dim <= TTT_WINDOW_MAX and (x.dtype != torch.float32 or head_dim % 16 == 0))


@functools.cache  # a pure count, asked on every call of the kernels: set up the ctypes call once
def _window_save(length: int, chunk: int, d: int) -> int:
    """Values the window kernels keep per (row, head) block (the C library's own count)."""
    fn = _library().benchbox_ttt_window_save
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int64] * 3
    return fn(length, chunk, d)


def ttt_window_forward(proj, lrb, tok, W, b1, gam, bet, cs, eta_scale: float, heads: int, chunk: int, eps: float):
    """(out (B, L, H D), saved) from the projection (B, L, 3 H D + H) (contiguous rows), scanned in chunks of ``chunk``
    positions (the last may be shorter) with the inner weights carried from chunk to chunk; lrb (H,), tok (K,) the
    token factors of mini-batches of K positions (a chunk holds one or several), W (H, D, D), b1 (H, 1, D), gam and bet
    (H, D), cs (L, D/2, 2) cos/sin or None, all contiguous."""
    batch, length, ps = proj.shape
    d = W.shape[-1]
    out = proj.new_empty(batch, length, heads * d)
    save = proj.new_empty(batch, heads, _window_save(length, chunk, d))
    _ttt_window_kernels()[proj.dtype][0](proj.data_ptr(), ps, lrb.data_ptr(), tok.data_ptr(), W.data_ptr(),
                                         b1.data_ptr(), gam.data_ptr(), bet.data_ptr(),
                                         0 if cs is None else cs.data_ptr(), float(eta_scale), out.data_ptr(),
                                         save.data_ptr(), batch, _parts(batch), length, heads, d, tok.shape[0], chunk,
                                         float(eps))
    return out, save


def ttt_window_backward(proj, tok, gam, cs, eta_scale: float, chunk: int, save, dout):
    """(dproj, dW, db (H, D), dgam, dbet, dtok (K,), dlrb (H,)) from dout (B, L, H D)."""
    import torch
    batch, length, ps = proj.shape
    heads, d = gam.shape
    dout = dout.contiguous()
    dproj = torch.empty_like(proj)
    parts = _parts(batch)
    dW = proj.new_zeros(parts, heads, d, d)
    db, dgam, dbet = (proj.new_zeros(parts, heads, d) for _ in range(3))
    dtok, dlrb = proj.new_zeros(parts, tok.shape[0]), proj.new_zeros(parts, heads)
    _ttt_window_kernels()[proj.dtype][1](proj.data_ptr(), ps, tok.data_ptr(), gam.data_ptr(),
                                         0 if cs is None else cs.data_ptr(), float(eta_scale), save.data_ptr(),
                                         dout.data_ptr(), dproj.data_ptr(), dW.data_ptr(), db.data_ptr(),
                                         dgam.data_ptr(), dbet.data_ptr(), dtok.data_ptr(), dlrb.data_ptr(), batch,
                                         parts, length, heads, d, tok.shape[0], chunk)
    return dproj, dW.sum(0), db.sum(0), dgam.sum(0), dbet.sum(0), dtok.sum(0), dlrb.sum(0)


@functools.cache
def _mlp_chunk_kernels():
    """{torch dtype: (forward, backward)} of TTT-MLP's one-mini-batch chunk (empty where no library)."""
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    return _kernel_pair("mlp_chunk_forward", [p] * 16 + [i] * 5 + [f], "mlp_chunk_backward", [p] * 26 + [i] * 5 + [f])


def mlp_chunk_applies(kq, d: int, f: int) -> bool:
    """Whether the TTT-MLP chunk kernels run for kq (BH, 2S, D): CPU, a dtype with a kernel, D at most 256 and
    for float32 D and the hidden width F multiples of 16."""
    import torch
    return (kq.device.type == "cpu" and kq.dtype in _mlp_chunk_kernels() and d <= 256
            and (kq.dtype != torch.float32 or (d % 16 == 0 and f % 16 == 0)))


@functools.cache  # a pure count, asked on every call of the kernels: set up the ctypes call once
def _mlp_work(s: int, d: int, f: int, backward: bool) -> int:
    """Values of scratch the TTT-MLP chunk kernels use per part (the C library's own count)."""
    fn = _library().benchbox_mlp_chunk_work
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int64] * 3 + [ctypes.c_int]
    return fn(s, d, f, int(backward))


def mlp_chunk_forward(kq, W1, b1, W2, b2, gt, gam2, P, coef, eT, update: bool, eps: float):
    """Zq (BH, S, D), and with ``update`` the weights after the chunk (W1n, b1n, W2n, b2n), of one TTT-MLP chunk of
    one mini-batch; every input contiguous, shapes as mixers.ttt._MLPChunk's."""
    import torch
    bh, s2, d = kq.shape
    s, f = s2 // 2, W1.shape[-1]
    zq = kq.new_empty(bh, s, d)
    new = (torch.empty_like(W1), torch.empty_like(b1), torch.empty_like(W2), torch.empty_like(b2)) if update else None
    parts = _parts(bh)
    work = kq.new_empty(parts, _mlp_work(s, d, f, False))
    args = [t.data_ptr() for t in (kq, W1, b1, W2, b2, gt, gam2, P, coef, eT, zq)]
    args += [t.data_ptr() for t in new] if update else [0, 0, 0, 0]
    _mlp_chunk_kernels()[kq.dtype][0](*args, work.data_ptr(), bh, parts, s, d, f, float(eps))
    return (zq, *new) if update else zq


def mlp_chunk_backward(kq, W1, b1, W2, b2, gt, gam2, P, coef, eT, dZq, dnew, eps: float):
    """(dkq, dW1, db1, dW2, db2, dgt, dgam2, dP, dcoef, deT) of ``mlp_chunk_forward`` from dZq (BH, S, D) and the new
    weights' gradients ``dnew`` (dW1n, db1n, dW2n, db2n; None: none); recomputes the chunk's forward."""
    import torch
    bh, s2, d = kq.shape
    s, f = s2 // 2, W1.shape[-1]
    dZq = dZq.contiguous()
    outs = (torch.empty_like(kq), torch.empty_like(W1), torch.empty_like(b1), torch.empty_like(W2),
            torch.empty_like(b2), torch.empty_like(gt), torch.empty_like(gam2), torch.empty_like(P),
            torch.empty_like(coef), torch.empty_like(eT))
    parts = _parts(bh)
    work = kq.new_empty(parts, _mlp_work(s, d, f, True))
    args = [t.data_ptr() for t in (kq, W1, b1, W2, b2, gt, gam2, P, coef, eT, dZq)]
    dnew = None if dnew is None else [t.contiguous() for t in dnew]  # kept alive through the call
    args += [t.data_ptr() for t in dnew] if dnew is not None else [0, 0, 0, 0]
    args += [t.data_ptr() for t in outs]
    _mlp_chunk_kernels()[kq.dtype][1](*args, work.data_ptr(), bh, parts, s, d, f, float(eps))
    return outs
