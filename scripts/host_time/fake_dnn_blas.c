/* cuDNN and cuBLAS stand-ins that do no work, for scripts/host-time.sh: every call
 * succeeds at once, so what a step costs is our side of each call (Python and ctypes),
 * not the real libraries' own host time (about 73 us per legacy cuDNN call on an H100
 * node with cuDNN 9.19; docs/benchmarks.md). Built twice, as libcudnn.so.9 and as
 * libcublas.so.13, with LIBRARY naming which.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

/* calls that queue GPU work, counted and printed per step at exit (HOST_TIME_STEPS) */
static long work_calls;

__attribute__((destructor)) static void print_counts(void) {
    const char *steps_text = getenv("HOST_TIME_STEPS");
    double steps = steps_text ? atof(steps_text) : 0;
    if (steps > 0) fprintf(stderr, "per step, %s: %.1f calls that queue GPU work\n", LIBRARY, work_calls / steps);
}

typedef struct {            /* cudnnConvolution*AlgoPerf_t (mpiconvnet/backends/cuda/cudnn.py) */
    int algo, status;
    float time;
    size_t memory;
    int determinism, mathType, reserved[3];
} AlgoPerf;

enum { FMA_MATH = 3 };

static int fake_handle;

size_t cudnnGetVersion(void) { return 91900; }
const char *cudnnGetErrorString(int status) { (void)status; return "host-time stand-in cuDNN"; }

/* handles and descriptors: any non-null pointer */
#define CREATE(name) int name(void **p) { *p = &fake_handle; return 0; }
CREATE(cudnnCreate)
CREATE(cudnnCreateTensorDescriptor)
CREATE(cudnnCreateFilterDescriptor)
CREATE(cudnnCreateConvolutionDescriptor)
CREATE(cudnnCreatePoolingDescriptor)
CREATE(cudnnCreateLRNDescriptor)
CREATE(cublasCreate_v2)

/* the algorithm searches: one algorithm, with no workspace, in FMA math */
static int one_algorithm(int requested, int *returned, AlgoPerf *perf) {
    if (requested < 1) return 3;  /* CUDNN_STATUS_BAD_PARAM */
    perf[0] = (AlgoPerf){0, 0, 1.0f, 0, 1, FMA_MATH, {0, 0, 0}};
    *returned = 1;
    return 0;
}
#define SEARCH(name) \
    int name(void *h, void *a, void *b, void *c, void *d, int n, int *returned, AlgoPerf *perf) { \
        (void)h; (void)a; (void)b; (void)c; (void)d; return one_algorithm(n, returned, perf); }
SEARCH(cudnnFindConvolutionForwardAlgorithm)
SEARCH(cudnnGetConvolutionForwardAlgorithm_v7)
SEARCH(cudnnFindConvolutionBackwardDataAlgorithm)
SEARCH(cudnnGetConvolutionBackwardDataAlgorithm_v7)
SEARCH(cudnnFindConvolutionBackwardFilterAlgorithm)
SEARCH(cudnnGetConvolutionBackwardFilterAlgorithm_v7)

#define WORKSPACE(name) \
    int name(void *h, void *a, void *b, void *c, void *d, int algo, size_t *size) { \
        (void)h; (void)a; (void)b; (void)c; (void)d; (void)algo; *size = 0; return 0; }
WORKSPACE(cudnnGetConvolutionForwardWorkspaceSize)
WORKSPACE(cudnnGetConvolutionBackwardDataWorkspaceSize)
WORKSPACE(cudnnGetConvolutionBackwardFilterWorkspaceSize)

/* everything else: success, nothing done (the arguments are not read, as in C a caller
 * may pass more than a function declares) */
#define NOTHING(name) int name(void) { return 0; }
#define WORK(name) int name(void) { work_calls++; return 0; }
NOTHING(cudnnDestroy) NOTHING(cudnnSetStream)
NOTHING(cudnnDestroyTensorDescriptor) NOTHING(cudnnSetTensor4dDescriptor)
NOTHING(cudnnDestroyFilterDescriptor) NOTHING(cudnnSetFilter4dDescriptor)
NOTHING(cudnnDestroyConvolutionDescriptor) NOTHING(cudnnSetConvolution2dDescriptor)
NOTHING(cudnnSetConvolutionGroupCount) NOTHING(cudnnSetConvolutionMathType)
WORK(cudnnConvolutionForward) WORK(cudnnConvolutionBackwardData) WORK(cudnnConvolutionBackwardFilter)
NOTHING(cudnnDestroyLRNDescriptor) NOTHING(cudnnSetLRNDescriptor)
WORK(cudnnLRNCrossChannelForward) WORK(cudnnLRNCrossChannelBackward)
NOTHING(cublasDestroy_v2) NOTHING(cublasSetStream_v2) NOTHING(cublasSetMathMode)
WORK(cublasSgemm_v2) WORK(cublasDgemm_v2)

/* the graph (backend) API of MPICONVNET_CUDNN_API=graph (cudnn_graph.py): descriptors are
 * any non-null pointer, the heuristics offer one engine with no numerical notes, its plan
 * needs no workspace, and execute is the call that queues work */
enum { HEURISTIC_RESULTS = 202, ENGINE_NUMERICAL_NOTE = 1303, PLAN_WORKSPACE_SIZE = 402 };
int cudnnBackendCreateDescriptor(int kind, void **p) { (void)kind; *p = &fake_handle; return 0; }
NOTHING(cudnnBackendDestroyDescriptor) NOTHING(cudnnBackendFinalize) NOTHING(cudnnBackendSetAttribute)
int cudnnBackendGetAttribute(void *d, int name, int type, long long requested, long long *count, void *values) {
    (void)d; (void)type;
    if (name == ENGINE_NUMERICAL_NOTE) { *count = 0; return 0; }
    if (name == PLAN_WORKSPACE_SIZE) { *(long long *)values = 0; *count = 1; return 0; }
    /* the heuristics' results (asked for none: how many) and a configuration's engine */
    *count = name == HEURISTIC_RESULTS && requested == 0 ? 1 : (requested > 0);
    return 0;
}
WORK(cudnnBackendExecute)
