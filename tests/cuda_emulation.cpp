// Runs the CUDA C kernels of runtime/search/kernels/ on the CPU, so their logic is tested where no GPU is.
//
// A launch runs its blocks one after another. Each CUDA thread of a block is a fiber (ucontext) on
// one OS thread; __syncthreads() returns to a scheduler that runs every other fiber of the block
// up to the same barrier before any goes on, which is the barrier's guarantee. Rounds alternate
// between ascending and descending thread order, so a missing barrier shows up as a wrong result
// whichever thread writes first. __shared__ variables are function statics (one block at a time
// uses them). That is all the kernels rely on: no warp intrinsics, no atomics. What this cannot
// show: timing, occupancy, and the device compiler's code generation (the nvcc/ptxas test covers
// compilation).
//
// Build: g++ -std=c++20 -O1 -shared -fPIC -I<cuda include> -DTOPK=<k> -DKERNEL_SOURCE='"<.cu path>"' cuda_emulation.cpp

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include <cuda_fp16.h>  // host implementations of __half, __half2 and their conversions

// The CUDA headers define these for host compilers too; here they mean plain C++.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

static uint3 threadIdx, blockIdx;
static dim3 gridDim, blockDim;

struct Fiber {
    ucontext_t context;
    std::vector<char> stack = std::vector<char>(64 * 1024);
    bool done = false;
};
static ucontext_t scheduler;
static Fiber* running;
static const std::function<void()>* kernel_body;

#define __syncthreads() swapcontext(&running->context, &scheduler)
using std::isnan;
using std::min;

#include KERNEL_SOURCE

static void fiber_main() {
    (*kernel_body)();
    running->done = true;  // returning resumes the scheduler through uc_link
}

static void launch(int grid_x, int grid_y, int threads, const std::function<void()>& kernel) {
    gridDim = dim3(grid_x, grid_y, 1);
    blockDim = dim3(threads, 1, 1);
    kernel_body = &kernel;
    std::vector<Fiber> fibers(threads);
    for (int by = 0; by < grid_y; ++by)
        for (int bx = 0; bx < grid_x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            blockIdx.z = 0;
            for (auto& fiber : fibers) {
                getcontext(&fiber.context);
                fiber.context.uc_stack.ss_sp = fiber.stack.data();
                fiber.context.uc_stack.ss_size = fiber.stack.size();
                fiber.context.uc_link = &scheduler;
                makecontext(&fiber.context, fiber_main, 0);
                fiber.done = false;
            }
            for (int round = 0, live = threads; live > 0; ++round) {
                live = 0;
                for (int i = 0; i < threads; ++i) {
                    const int t = round % 2 ? threads - 1 - i : i;
                    if (fibers[t].done) continue;
                    threadIdx.x = t;
                    threadIdx.y = threadIdx.z = 0;
                    running = &fibers[t];
                    swapcontext(&scheduler, &fibers[t].context);
                    live += !fibers[t].done;
                }
            }
        }
}

extern "C" {
void emu_to_half(int gx, int gy, int threads, const void* src, int dim, int padded, void* dst) {
    launch(gx, gy, threads, [&] { to_half((const float*)src, dim, padded, (__half*)dst); });
}
void emu_sq_norms_f32(int gx, int gy, int threads, const void* x, int dim, void* out) {
    launch(gx, gy, threads, [&] { sq_norms_f32((const float*)x, dim, (float*)out); });
}
void emu_sq_norms_f16(int gx, int gy, int threads, const void* x, int dim, void* out) {
    launch(gx, gy, threads, [&] { sq_norms_f16((const __half*)x, dim, (float*)out); });
}
void emu_euclidean_topk_f32(int gx, int gy, int threads, const void* x, const void* x_sq, const void* bank,
                            const void* bank_sq, int n, int m, int dim, int per_slice, void* part_d, void* part_i) {
    launch(gx, gy, threads, [&] {
        euclidean_topk_f32((const float*)x, (const float*)x_sq, (const float*)bank, (const float*)bank_sq, n, m, dim,
                           per_slice, (float*)part_d, (int*)part_i);
    });
}
void emu_euclidean_topk_f16(int gx, int gy, int threads, const void* x, const void* x_sq, const void* bank,
                            const void* bank_sq, int n, int m, int dim, int per_slice, void* part_d, void* part_i) {
    launch(gx, gy, threads, [&] {
        euclidean_topk_f16((const __half*)x, (const float*)x_sq, (const __half*)bank, (const float*)bank_sq, n, m,
                           dim, per_slice, (float*)part_d, (int*)part_i);
    });
}
void emu_merge_topk(int gx, int gy, int threads, const void* part_d, const void* part_i, int n, int lists,
                    void* out_d, void* out_i) {
    launch(gx, gy, threads,
           [&] { merge_topk((const float*)part_d, (const int*)part_i, n, lists, (float*)out_d, (int*)out_i); });
}
}
