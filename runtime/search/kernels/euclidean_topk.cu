// Fused nearest-neighbour search for PatchCore: for every query row x, the k smallest
// |x|^2 - 2 x.y + |y|^2 over the memory bank rows y, and their indices.
//
// The query x bank distance matrix never reaches global memory: each block computes one
// TILE x TILE piece of it in shared memory, and every thread folds its share of a query row
// into a top-k list held in registers. Only those lists (a few per query row) are written
// out and merged by a second kernel. Bank row norms are computed once when the bank is
// uploaded. Half-precision inputs are read as half2 pairs and accumulated in float.
//
// Compile with -DTOPK=<k>. The host side (patchline/runtime/search/gpu_distance.py) reads the
// #defines below, so geometry lives only here. Launches:
//   to_half(src, dim, padded, dst)               grid (rows),                       block (NORM_THREADS)
//   sq_norms_{f32,f16}(x, dim, out)              grid (rows),                       block (NORM_THREADS)
//   euclidean_topk_{f32,f16}(...)                grid (ceil(n / TILE), slices),     block (THREADS)
//   merge_topk(part_d, part_i, n, lists, ...)    grid (ceil(n / MERGE_ROWS)),       block (MERGE_THREADS)

#include <cuda_fp16.h>

#ifndef TOPK
#error "compile with -DTOPK=<k>"
#endif

#define TILE 64            // query rows and bank rows per tile
#define CHUNK 32           // embedding dims staged in shared memory at a time
#define THREADS 256        // 16 x 16 threads; each computes a 4 x 4 piece of the tile
#define LANES 4            // threads sharing one query row when folding distances into lists
#define NORM_THREADS 128
#define MERGE_THREADS 128
#define MERGE_LANES 8      // threads sharing one query row's lists in the merge
#define MERGE_ROWS 16      // query rows per merge block: MERGE_THREADS / MERGE_LANES
#define DIST_PAD 16        // dist's row stride is TILE + DIST_PAD = 16 (mod 32) floats: see topk_tiles
#define NO_INDEX 2147483647
static_assert(MERGE_ROWS * MERGE_LANES == MERGE_THREADS, "a merge block holds MERGE_ROWS rows of MERGE_LANES threads");
static_assert((TILE + DIST_PAD) % 32 == 16, "the distance tile's stores and folds are conflict-free at this stride");

// Keeps (best_d, best_i) sorted ascending by distance, then index. With the loops unrolled
// every array index is a constant, so the lists stay in registers.
__device__ __forceinline__ void push(float (&best_d)[TOPK], int (&best_i)[TOPK], float d, int i) {
    if (!(d < best_d[TOPK - 1] || (d == best_d[TOPK - 1] && i < best_i[TOPK - 1]))) return;
#pragma unroll
    for (int j = 0; j < TOPK; ++j) {
        const bool better = d < best_d[j] || (d == best_d[j] && i < best_i[j]);
        const float keep_d = best_d[j];
        const int keep_i = best_i[j];
        best_d[j] = better ? d : keep_d;
        best_i[j] = better ? i : keep_i;
        d = better ? keep_d : d;
        i = better ? keep_i : i;
    }
}

__device__ __forceinline__ void clear(float (&best_d)[TOPK], int (&best_i)[TOPK]) {
#pragma unroll
    for (int j = 0; j < TOPK; ++j) {
        best_d[j] = INFINITY;
        best_i[j] = NO_INDEX;
    }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Stages rows [row0, row0 + TILE) x dims [d0, d0 + CHUNK) transposed into dst[dim][row],
// zero-filled past the matrix edge so partial tiles need no special case in the inner loop.
// Consecutive threads read consecutive dims (coalesced); the +1 padding of dst keeps the
// transposed stores on distinct shared-memory banks.
__device__ __forceinline__ void stage(const float* __restrict__ src, int rows, int dim, int row0, int d0,
                                      float (*dst)[TILE + 1]) {
    for (int e = threadIdx.x; e < TILE * CHUNK; e += THREADS) {
        const int r = e / CHUNK, c = e % CHUNK;
        const int gr = row0 + r, gc = d0 + c;
        dst[c][r] = (gr < rows && gc < dim) ? src[(size_t)gr * dim + gc] : 0.0f;
    }
}

// Half version: one half2 (two dims) per load. The host pads dim to an even number, so a
// pair is either wholly inside the row or wholly past its end, and every pair is aligned.
__device__ __forceinline__ void stage(const __half* __restrict__ src, int rows, int dim, int row0, int d0,
                                      float (*dst)[TILE + 1]) {
    for (int e = threadIdx.x; e < TILE * CHUNK / 2; e += THREADS) {
        const int r = e / (CHUNK / 2), p = e % (CHUNK / 2);
        const int gr = row0 + r, gc = d0 + 2 * p;
        float2 v = make_float2(0.0f, 0.0f);
        if (gr < rows && gc < dim) v = __half22float2(*reinterpret_cast<const __half2*>(src + (size_t)gr * dim + gc));
        dst[2 * p][r] = v.x;
        dst[2 * p + 1][r] = v.y;
    }
}

template <typename T>
__device__ __forceinline__ void sq_norms(const T* __restrict__ x, int dim, float* __restrict__ out) {
    __shared__ float partial[NORM_THREADS];
    const T* row = x + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < dim; c += NORM_THREADS) {
        const float v = to_float(row[c]);
        s = fmaf(v, v, s);
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int width = NORM_THREADS / 2; width > 0; width /= 2) {
        if ((int)threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Block (bx, by): query rows [bx * TILE, +TILE) against the bank tiles of slice by. Splitting the
// bank into slices gives the GPU enough blocks when there are few queries (one frame).
// Output: for each query row q and each of the slices * LANES lists, TOPK (distance², index)
// pairs at part[(list * TOPK + j) * n + q], so the merge kernel reads them coalesced.
template <typename T>
__device__ __forceinline__ void topk_tiles(const T* __restrict__ x, const float* __restrict__ x_sq,
                                           const T* __restrict__ bank, const float* __restrict__ bank_sq, int n,
                                           int m, int dim, int tiles_per_slice, float* __restrict__ part_d,
                                           int* __restrict__ part_i) {
    __shared__ float xs[CHUNK][TILE + 1];
    __shared__ float ys[CHUNK][TILE + 1];
    // Row stride = 16 (mod 32): a warp stores two rows of 16 columns, which then fall on distinct banks.
    // The fold below reads 8 rows x LANES columns per warp; it starts each pair of rows at another column
    // step, so those reads fall on distinct banks too (rows of one parity share banks at this stride).
    __shared__ float dist[TILE][TILE + DIST_PAD];

    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int row = threadIdx.x / LANES, lane = threadIdx.x % LANES;
    const int q0 = blockIdx.x * TILE;
    const int first = blockIdx.y * tiles_per_slice;
    const int last = min(first + tiles_per_slice, (m + TILE - 1) / TILE);

    float best_d[TOPK];
    int best_i[TOPK];
    clear(best_d, best_i);

    for (int tile = first; tile < last; ++tile) {
        const int b0 = tile * TILE;
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

        for (int d0 = 0; d0 < dim; d0 += CHUNK) {
            stage(x, n, dim, q0, d0, xs);
            stage(bank, m, dim, b0, d0, ys);
            __syncthreads();
#pragma unroll 8
            for (int c = 0; c < CHUNK; ++c) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    a[i] = xs[c][ty + 16 * i];
                    b[i] = ys[c][tx + 16 * i];
                }
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();
        }

#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = ty + 16 * i, c = tx + 16 * j;
                const int q = q0 + r, b = b0 + c;
                const float d = (q < n && b < m) ? x_sq[q] + bank_sq[b] - 2.0f * acc[i][j] : INFINITY;
                // Rounding can push the distance of near-identical rows below zero, as on the CPU. A NaN
                // (a non-finite query or bank row) becomes +inf, never 0, which fmaxf(NaN, 0) would give:
                // such a query's k nearest are all infinitely far, and the host refuses the frame.
                dist[r][c] = isnan(d) ? INFINITY : fmaxf(d, 0.0f);
            }
        __syncthreads();
        // No barrier after the fold: the next tile writes dist only after its first staging
        // barrier, which every thread reaches only once it has folded this tile. The order of the
        // columns does not change the list: push breaks ties by index.
        const int valid = min(TILE, m - b0), start = (row % 8) / 2;
        for (int step = 0; step < TILE / LANES; ++step) {
            const int c = lane + LANES * ((step + start) % (TILE / LANES));
            if (c < valid) push(best_d, best_i, dist[row][c], b0 + c);
        }
    }

    const int q = q0 + row;
    if (q < n) {
        const int list = blockIdx.y * LANES + lane;
#pragma unroll
        for (int j = 0; j < TOPK; ++j) {
            const size_t at = ((size_t)list * TOPK + j) * n + q;
            part_d[at] = best_d[j];
            part_i[at] = best_i[j];
        }
    }
}

// FP16 queries arrive as float and are rounded here: on the host, numpy's float16 cast took longer than the
// search itself. A value beyond ±65504 rounds to inf, and the search makes such a row infinitely far.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    to_half(const float* src, int dim, int padded, __half* dst) {
    const size_t row = blockIdx.x;
    for (int c = threadIdx.x; c < padded; c += blockDim.x)
        dst[row * padded + c] = __float2half_rn(c < dim ? src[row * dim + c] : 0.0f);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) sq_norms_f32(const float* x, int dim, float* out) {
    sq_norms(x, dim, out);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) sq_norms_f16(const __half* x, int dim, float* out) {
    sq_norms(x, dim, out);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    euclidean_topk_f32(const float* x, const float* x_sq, const float* bank, const float* bank_sq, int n, int m,
                       int dim, int tiles_per_slice, float* part_d, int* part_i) {
    topk_tiles(x, x_sq, bank, bank_sq, n, m, dim, tiles_per_slice, part_d, part_i);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    euclidean_topk_f16(const __half* x, const float* x_sq, const __half* bank, const float* bank_sq, int n, int m,
                       int dim, int tiles_per_slice, float* part_d, int* part_i) {
    topk_tiles(x, x_sq, bank, bank_sq, n, m, dim, tiles_per_slice, part_d, part_i);
}

// MERGE_LANES threads per query row each fold every MERGE_LANES-th list entry, then the first folds the
// others' lists into the final k, ascending, as distances. Several threads per row give one frame's
// queries enough blocks to fill the GPU. A warp reads 16 consecutive rows of 2 entries: whole sectors.
extern "C" __global__ void __launch_bounds__(MERGE_THREADS)
    merge_topk(const float* __restrict__ part_d, const int* __restrict__ part_i, int n, int lists,
               float* __restrict__ out_d, int* __restrict__ out_i) {
    __shared__ float share_d[TOPK][MERGE_THREADS];
    __shared__ int share_i[TOPK][MERGE_THREADS];
    const int slot = threadIdx.x % MERGE_ROWS, lane = threadIdx.x / MERGE_ROWS;
    const int q = blockIdx.x * MERGE_ROWS + slot;
    float best_d[TOPK];
    int best_i[TOPK];
    clear(best_d, best_i);
    if (q < n)
        for (int e = lane; e < lists * TOPK; e += MERGE_LANES)
            push(best_d, best_i, part_d[(size_t)e * n + q], part_i[(size_t)e * n + q]);
#pragma unroll
    for (int j = 0; j < TOPK; ++j) {
        share_d[j][threadIdx.x] = best_d[j];
        share_i[j][threadIdx.x] = best_i[j];
    }
    __syncthreads();
    if (q >= n || lane != 0) return;
    for (int other = slot + MERGE_ROWS; other < MERGE_THREADS; other += MERGE_ROWS)
#pragma unroll
        for (int j = 0; j < TOPK; ++j) push(best_d, best_i, share_d[j][other], share_i[j][other]);
#pragma unroll
    for (int j = 0; j < TOPK; ++j) {
        out_d[(size_t)q * TOPK + j] = sqrtf(best_d[j]);
        out_i[(size_t)q * TOPK + j] = best_i[j];
    }
}
