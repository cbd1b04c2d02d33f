/* A stand-in for libnvidia-ml.so.1 that the real pynvml (nvidia-ml-py) loads, so CI runs pynvml's ctypes
 * layouts, versioned structs, two-call buffers, event sets and GPM without a GPU.
 *
 * Written from pynvml.py's own struct definitions (x86-64 / aarch64 LP64 layouts). Only the calls the
 * exporter, bench/capture_gpu.py and exporter/sources/gpm.py make are here; any other is absent, which
 * pynvml reports as NVMLError_FunctionNotFound, as with an old driver.
 *
 * Values and faults come from a key=value file named by $NVML_STUB_CONFIG, re-read whenever the file
 * changes (write a new file and rename it over the old one). "KEY.GPU" overrides "KEY" for one GPU.
 *   gpus=2  name=...  driver=...  util=37  mem_util=12  mem_total=85899345920  mem_used=1073741824
 *   temp=41  power_mw=250000  limit_mw=700000  energy_mj=123456  sm_mhz=1755  mem_mhz=2619
 *   reasons=4  pcie_gen=5  pcie_width=16  pcie_tx_bps=1e9  pcie_rx_bps=2e9  replay=0
 *   pcie_cur_gen=1  pcie_cur_width=8   current link (default: the maximum)   pcie_counters=0  (fields 197/198 NotSupported)
 *   uuid=GPU-...  bus_id=00000000:01:00.0  mem_reserved=536870912  fan=30  pstate=8  remap_corr=0 remap_unc=0 remap_pending=0 remap_failure=0
 *   mem_total.gi<N>=..  mem_used.gi<N>=..  mem_reserved.gi<N>=..   a MIG device's memory (GPU instance N)
 *   gprocs=1234:1048576            graphics processes (pid:bytes; 18446744073709551615 = N/A)
 *   KEY=na                         a reading's call answers NotSupported (e.g. sm_mhz=na: only that clock)
 *   samples=10,90,50  sample_period_s=0.1667  sample_depth=120   (the driver's utilisation buffer)
 *   procs=1234:1048576,99:0        processes (pid:bytes)
 *   proc_util=1234:55              per-process SM utilisation samples (pid:percent)
 *   gpm_supported=1                nvmlGpmQueryDeviceSupport's isSupportedDevice
 *   gpm.<id>=42.5  gpm.<id>.gi<N>=..   GPM metric values (per GPU instance); unset -> per-metric NotSupported
 *   nvlink_links=18  nvlink_tx_kib_s=1000  nvlink_rx_kib_s=2000   per-link counters (fields 91, 138, 139)
 *   fields 83 (energy_mj), 94 (replay), 185 (power_mw) answer what their calls answer, and refuse as they do
 *   field_na=83,185                these field ids answer NotSupported (a driver older than the field);
 *                                  their calls keep answering
 *   mig=1,2                        MIG mode on with these GPU instance ids
 *   xid=0:79,1:31                  XID events, queued afresh each time the file is (re)loaded
 *   lost_gpu=1  lost_after_s=0.5   that GPU answers GpuIsLost from that long after this file was loaded
 *   fail.<function>=3              that call returns this nvmlReturn_t (3 NotSupported, 999 Unknown, ...)
 *   block.<function>=2.5           that call sleeps this long first (a hung driver call)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

typedef int nvmlReturn_t;
enum { OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, NOT_SUPPORTED = 3, NOT_FOUND = 6,
       INSUFFICIENT_SIZE = 7, TIMEOUT = 10, GPU_IS_LOST = 15, ARGUMENT_VERSION_MISMATCH = 25 };
enum { VT_UINT = 1, VT_ULL = 3 };
enum { FI_NVLINK_LINK_COUNT = 91, FI_NVLINK_TX = 138, FI_NVLINK_RX = 139, FI_PCIE_TX = 197, FI_PCIE_RX = 198,
       FI_ENERGY = 83, FI_REPLAY = 94, FI_POWER_AVERAGE = 185 };
#define MAX_GPUS 64
#define MAX_MIG 7
#define MAX_ENTRIES 256
#define XID_EVENT 0x8ULL
#define GPM_MAGIC 0x67706d73u

/* ---- structs, as pynvml declares them ---------------------------------------------------------- */
typedef union { double d; unsigned ui; unsigned long ul; unsigned long long ull; long long sll; int si;
                unsigned short us; } nvmlValue_t;
typedef struct { unsigned gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { char busIdLegacy[16]; unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
                 char busId[32]; } nvmlPciInfo_t;
typedef struct { unsigned pid; unsigned long long usedGpuMemory; unsigned gpuInstanceId, computeInstanceId; }
    nvmlProcessInfo_t;
typedef struct { unsigned long long timeStamp; nvmlValue_t sampleValue; } nvmlSample_t;
typedef struct { unsigned pid; unsigned long long timeStamp; unsigned smUtil, memUtil, encUtil, decUtil; }
    nvmlProcessUtilizationSample_t;
typedef struct { uint32_t fieldId, scopeId; int64_t timestamp, latencyUsec; unsigned valueType;
                 nvmlReturn_t nvmlReturn; nvmlValue_t value; } nvmlFieldValue_t;
typedef struct device { int gpu; int gi; } *nvmlDevice_t;  /* gi < 0: the GPU itself, else a MIG device */
typedef struct { nvmlDevice_t device; unsigned long long eventType, eventData; unsigned gpuInstanceId,
                 computeInstanceId; } nvmlEventData_t;
typedef struct eventset { int registered[MAX_GPUS]; unsigned long long seen; } *nvmlEventSet_t;
typedef struct { unsigned version, isSupportedDevice; } nvmlGpmSupport_t;
typedef struct gpmsample { unsigned magic; int gpu, gi; double t; } *nvmlGpmSample_t;
typedef struct { char *shortName, *longName, *unit; } nvmlGpmMetricInfo_t;
typedef struct { unsigned metricId; nvmlReturn_t nvmlReturn; double value; nvmlGpmMetricInfo_t metricInfo; }
    nvmlGpmMetric_t;
typedef struct { unsigned version, numMetrics; nvmlGpmSample_t sample1, sample2; nvmlGpmMetric_t metrics[]; }
    nvmlGpmMetricsGet_t;

/* For the test that compares these layouts with pynvml's ctypes ones (not an NVML function). */
size_t nvmlStubSizeof(const char *type) {
#define SIZE(t) if (!strcmp(type, #t)) return sizeof(t);
    SIZE(nvmlValue_t) SIZE(nvmlUtilization_t) SIZE(nvmlMemory_t) SIZE(nvmlMemory_v2_t) SIZE(nvmlPciInfo_t)
    SIZE(nvmlProcessInfo_t) SIZE(nvmlSample_t) SIZE(nvmlProcessUtilizationSample_t) SIZE(nvmlFieldValue_t)
    SIZE(nvmlEventData_t) SIZE(nvmlGpmSupport_t) SIZE(nvmlGpmMetric_t) SIZE(nvmlGpmMetricsGet_t)
#undef SIZE
    return 0;
}

/* ---- configuration ------------------------------------------------------------------------------ */
struct config { int n; char key[MAX_ENTRIES][64]; char val[MAX_ENTRIES][192]; };
static struct config *cfg;  /* replaced whole on reload; old ones are leaked on purpose (readers may hold them) */
static struct timespec cfg_mtime;
static off_t cfg_size = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int init_count;
static double t_first_init = -1, t_loaded;
static struct device devices[MAX_GPUS], mig_devices[MAX_GPUS][MAX_MIG];
static struct { int gpu; unsigned long long xid, seq; } xids[64];  /* seq: 1, 2, ... over all loads */
static int n_xids;
static unsigned long long xid_seq;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = 0;
    return s;
}

static const char *lookup(const struct config *c, const char *key) {
    for (int i = 0; c && i < c->n; i++)
        if (!strcmp(c->key[i], key)) return c->val[i];
    return NULL;
}

static void queue_xids(const char *list) {
    const char *p = list;
    while (p && *p && n_xids < 64) {
        int gpu;
        unsigned long long xid;
        if (sscanf(p, "%d:%llu", &gpu, &xid) == 2) {
            xids[n_xids].gpu = gpu;
            xids[n_xids].xid = xid;
            xids[n_xids++].seq = ++xid_seq;
        }
        p = strchr(p, ',');
        if (p) p++;
    }
}

/* Re-reads the file when its mtime or size changed. Called under mu. */
static void reload(void) {
    const char *path = getenv("NVML_STUB_CONFIG");
    struct stat st;
    if (!path || stat(path, &st) != 0) return;
    if (cfg && st.st_mtim.tv_sec == cfg_mtime.tv_sec && st.st_mtim.tv_nsec == cfg_mtime.tv_nsec &&
        st.st_size == cfg_size) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    struct config *c = calloc(1, sizeof *c);
    char line[512];
    while (c->n < MAX_ENTRIES && fgets(line, sizeof line, f)) {
        char *eq = strchr(line, '=');
        char *k = trim(line);
        if (!eq || *k == '#') continue;
        *eq = 0;
        snprintf(c->key[c->n], sizeof c->key[0], "%s", trim(k));
        snprintf(c->val[c->n], sizeof c->val[0], "%s", trim(eq + 1));
        c->n++;
    }
    fclose(f);
    __atomic_store_n(&cfg, c, __ATOMIC_RELEASE);
    cfg_mtime = st.st_mtim;
    cfg_size = st.st_size;
    t_loaded = now_s();
    n_xids = 0;  /* a new file replaces the events of the old one */
    const char *x = lookup(c, "xid");
    if (x) queue_xids(x);
}

/* Re-reads the file if it changed: once per call, in enter(), so a call sees one configuration. */
static void refresh(void) {
    pthread_mutex_lock(&mu);
    reload();
    pthread_mutex_unlock(&mu);
}

/* "key.gpu" first, then "key". */
static const char *get(const char *key, int gpu) {
    const struct config *c = __atomic_load_n(&cfg, __ATOMIC_ACQUIRE);
    char k[96];
    snprintf(k, sizeof k, "%s.%d", key, gpu);
    const char *v = gpu >= 0 ? lookup(c, k) : NULL;
    return v ? v : lookup(c, key);
}

static double num(const char *key, int gpu, double dflt) {
    const char *v = get(key, gpu);
    return v ? strtod(v, NULL) : dflt;
}

/* "na": the call behind this reading answers NotSupported (nvidia-smi showed N/A). */
static int is_na(const char *key, int gpu) {
    const char *v = get(key, gpu);
    return v && !strcmp(v, "na");
}

static int gpu_count(void) {
    int n = (int)num("gpus", -1, 2);
    return n < 0 ? 0 : n > MAX_GPUS ? MAX_GPUS : n;
}

static void sleep_s(double s) {
    struct timespec ts = { (time_t)s, (long)((s - (time_t)s) * 1e9) };
    nanosleep(&ts, NULL);
}

static int valid(nvmlDevice_t d) {
    if (d >= devices && d < devices + MAX_GPUS) return d->gpu < gpu_count();
    return d >= &mig_devices[0][0] && d < &mig_devices[0][0] + MAX_GPUS * MAX_MIG;
}

/* Calls per function since load (benches: NVML calls per GPU per tick). __func__ is one static string per
 * function, so the pointer names it. nvmlStubCalls() writes "name count" lines; nvmlStubResetCalls zeroes. */
#define MAX_COUNTED 128
static const char *counted_fn[MAX_COUNTED];
static unsigned long long counted_n[MAX_COUNTED];
static pthread_mutex_t count_mu = PTHREAD_MUTEX_INITIALIZER;

static void count_call(const char *fn) {
    pthread_mutex_lock(&count_mu);
    for (int i = 0; i < MAX_COUNTED; i++) {
        if (!counted_fn[i]) counted_fn[i] = fn;
        if (counted_fn[i] == fn) { counted_n[i]++; break; }
    }
    pthread_mutex_unlock(&count_mu);
}

int nvmlStubCalls(char *buf, unsigned len) {
    unsigned off = 0;
    pthread_mutex_lock(&count_mu);
    for (int i = 0; i < MAX_COUNTED && counted_fn[i] && off < len; i++) {
        int w = snprintf(buf + off, len - off, "%s %llu\n", counted_fn[i], counted_n[i]);
        if (w < 0 || (unsigned)w >= len - off) break;
        off += (unsigned)w;
    }
    pthread_mutex_unlock(&count_mu);
    return (int)off;
}

void nvmlStubResetCalls(void) {
    pthread_mutex_lock(&count_mu);
    memset(counted_n, 0, sizeof counted_n);
    pthread_mutex_unlock(&count_mu);
}

/* Every call starts here: initialised?, a hung call, an injected error, a lost GPU. */
static nvmlReturn_t enter(const char *fn, nvmlDevice_t d) {
    count_call(fn);
    if (!init_count) return UNINITIALIZED;
    refresh();
    if (d && !valid(d)) return INVALID_ARGUMENT;
    int gpu = d ? d->gpu : -1;
    char k[128];
    snprintf(k, sizeof k, "block.%s", fn);
    double block = num(k, gpu, 0);
    if (block > 0) sleep_s(block);
    snprintf(k, sizeof k, "fail.%s", fn);
    int fail = (int)num(k, gpu, 0);
    if (fail) return fail;
    if (gpu >= 0 && (int)num("lost_gpu", -1, -1) == gpu && now_s() - t_loaded >= num("lost_after_s", -1, 0))
        return GPU_IS_LOST;
    return OK;
}

#define ENTER(d) do { nvmlReturn_t r_ = enter(__func__, (d)); if (r_) return r_; } while (0)
#define ENTER_GPU(idx) do { nvmlReturn_t r_ = enter(__func__, &devices[idx]); if (r_) return r_; } while (0)
#define PUT(ptr, value) do { if (!(ptr)) return INVALID_ARGUMENT; *(ptr) = (value); } while (0)

/* ---- library ------------------------------------------------------------------------------------ */
nvmlReturn_t nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_GPUS; i++) {
        devices[i] = (struct device){ i, -1 };
        for (int j = 0; j < MAX_MIG; j++) mig_devices[i][j] = (struct device){ i, j };
    }
    if (t_first_init < 0) t_first_init = now_s();
    reload();
    pthread_mutex_unlock(&mu);
    int fail = (int)num("fail.nvmlInit", -1, 0);
    if (fail) return fail;
    __atomic_add_fetch(&init_count, 1, __ATOMIC_SEQ_CST);
    return OK;
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (!init_count) return UNINITIALIZED;
    __atomic_sub_fetch(&init_count, 1, __ATOMIC_SEQ_CST);
    return OK;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case OK: return "Success";
    case UNINITIALIZED: return "Uninitialized";
    case INVALID_ARGUMENT: return "Invalid Argument";
    case NOT_SUPPORTED: return "Not Supported";
    case NOT_FOUND: return "Not Found";
    case INSUFFICIENT_SIZE: return "Insufficient Size";
    case TIMEOUT: return "Timeout";
    case GPU_IS_LOST: return "GPU is lost";
    case ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t put_string(char *buf, unsigned len, const char *s) {
    if (!buf) return INVALID_ARGUMENT;
    if (strlen(s) + 1 > len) return INSUFFICIENT_SIZE;
    strcpy(buf, s);
    return OK;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned len) {
    ENTER(NULL);
    const char *v = get("driver", -1);
    return put_string(buf, len, v ? v : "570.86.15");
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) { ENTER(NULL); PUT(count, (unsigned)gpu_count()); return OK; }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *out) {
    if (index >= MAX_GPUS) return init_count ? INVALID_ARGUMENT : UNINITIALIZED;
    ENTER_GPU(index);  /* an index past `gpus` is not a valid device: INVALID_ARGUMENT */
    PUT(out, &devices[index]);
    return OK;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned *index) { ENTER(d); PUT(index, (unsigned)d->gpu); return OK; }

/* ---- identity ----------------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *buf, unsigned len) {
    ENTER(d);
    const char *v = get("name", d->gpu);
    return put_string(buf, len, v ? v : "NVIDIA H100 80GB HBM3");
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned len) {
    ENTER(d);
    char uuid[96];
    const char *v = d->gi < 0 ? get("uuid", d->gpu) : NULL;
    if (v) snprintf(uuid, sizeof uuid, "%s", v);
    else if (d->gi < 0) snprintf(uuid, sizeof uuid, "GPU-5eb0c0de-0000-4000-8000-%012d", d->gpu);
    else snprintf(uuid, sizeof uuid, "MIG-5eb0c0de-0000-4000-8000-%06d%06d", d->gpu, d->gi);
    return put_string(buf, len, uuid);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    ENTER(d);
    if (!p) return INVALID_ARGUMENT;
    memset(p, 0, sizeof *p);
    p->bus = 0x18 + d->gpu;
    p->pciDeviceId = 0x233010de;
    const char *v = get("bus_id", d->gpu);  /* "00000000:01:00.0" as nvidia-smi shows it */
    unsigned domain, bus, dev, fn;
    if (v && sscanf(v, "%x:%x:%x.%x", &domain, &bus, &dev, &fn) == 4 && bus < 256 && dev < 32 && fn < 8) {
        p->domain = domain;
        p->bus = bus;
        p->device = dev;
        snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%04X:%02X:%02X.%X", domain & 0xffff, bus, dev, fn);
        snprintf(p->busId, sizeof p->busId, "%08X:%02X:%02X.%X", domain, bus, dev, fn);
        return OK;
    }
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "0000:%02X:00.0", p->bus);
    snprintf(p->busId, sizeof p->busId, "00000000:%02X:00.0", p->bus);
    return OK;
}

static nvmlReturn_t put_uint(nvmlDevice_t d, const char *key, double dflt, unsigned *out) {
    if (is_na(key, d->gpu)) return NOT_SUPPORTED;
    PUT(out, (unsigned)num(key, d->gpu, dflt));
    return OK;
}
#define UINT_CALL(fn, key, dflt) \
    nvmlReturn_t fn(nvmlDevice_t d, unsigned *out) { ENTER(d); return put_uint(d, key, dflt, out); }
UINT_CALL(nvmlDeviceGetMaxPcieLinkGeneration, "pcie_gen", 5)
UINT_CALL(nvmlDeviceGetMaxPcieLinkWidth, "pcie_width", 16)
nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t d, unsigned *out) {
    ENTER(d);
    return put_uint(d, get("pcie_cur_gen", d->gpu) ? "pcie_cur_gen" : "pcie_gen", 5, out);
}
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t d, unsigned *out) {
    ENTER(d);
    return put_uint(d, get("pcie_cur_width", d->gpu) ? "pcie_cur_width" : "pcie_width", 16, out);
}
UINT_CALL(nvmlDeviceGetPcieReplayCounter, "replay", 0)
UINT_CALL(nvmlDeviceGetPowerUsage, "power_mw", 250000)
UINT_CALL(nvmlDeviceGetEnforcedPowerLimit, "limit_mw", 700000)
UINT_CALL(nvmlDeviceGetMaxMigDeviceCount, "mig_max", 7)
UINT_CALL(nvmlDeviceGetPerformanceState, "pstate", 0)

nvmlReturn_t nvmlDeviceGetFanSpeed_v2(nvmlDevice_t d, unsigned fan, unsigned *speed) {
    ENTER(d);
    if (!get("fan", d->gpu)) return NOT_SUPPORTED;  /* fanless unless configured, as an SXM board */
    if (fan != 0) return INVALID_ARGUMENT;
    return put_uint(d, "fan", 0, speed);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned *is_mig) { ENTER(d); PUT(is_mig, d->gi >= 0); return OK; }

/* ---- readings ----------------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    ENTER(d);
    PUT(u, ((nvmlUtilization_t){ (unsigned)num("util", d->gpu, 37), (unsigned)num("mem_util", d->gpu, 12) }));
    return OK;
}

/* The GPU's memory, or with gi >= 0 a MIG device's (mem_total.gi<N>, ...; falling back to the GPU's). */
static void memory(nvmlDevice_t d, unsigned long long *total, unsigned long long *used, unsigned long long *reserved) {
    char k[3][48];
    const char *base[3] = { "mem_total", "mem_used", "mem_reserved" };
    for (int i = 0; i < 3; i++) {
        if (d->gi >= 0) snprintf(k[i], sizeof k[i], "%s.gi%d", base[i], d->gi);
        if (d->gi < 0 || !get(k[i], d->gpu)) snprintf(k[i], sizeof k[i], "%s", base[i]);
    }
    *total = num(k[0], d->gpu, 85520809984.0);
    *used = num(k[1], d->gpu, 2e10);
    *reserved = num(k[2], d->gpu, 536870912.0);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    ENTER(d);
    unsigned long long total, used, reserved;  /* v1 counts the driver's reservation as used */
    memory(d, &total, &used, &reserved);
    PUT(m, ((nvmlMemory_t){ total, total - used - reserved, used + reserved }));
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    ENTER(d);
    if (!m) return INVALID_ARGUMENT;
    if (m->version != (sizeof *m | 2u << 24)) return ARGUMENT_VERSION_MISMATCH;
    unsigned long long total, used, reserved;
    memory(d, &total, &used, &reserved);
    m->total = total;
    m->reserved = reserved;
    m->used = used;
    m->free = total - used - m->reserved;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned *t) {
    ENTER(d);
    if (sensor != 0) return INVALID_ARGUMENT;
    return put_uint(d, "temp", 41, t);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
    ENTER(d);
    PUT(mj, (unsigned long long)num("energy_mj", d->gpu, 123456789));
    return OK;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned *mhz) {
    ENTER(d);  /* put_uint answers NotSupported for a clock configured as "na" */
    if (type == 1) return put_uint(d, "sm_mhz", 1755, mhz);   /* NVML_CLOCK_SM */
    if (type == 2) return put_uint(d, "mem_mhz", 2619, mhz);  /* NVML_CLOCK_MEM */
    return put_uint(d, "graphics_mhz", 1755, mhz);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *r) {
    ENTER(d);
    PUT(r, (unsigned long long)num("reasons", d->gpu, 0));
    return OK;
}
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *r) {
    ENTER(d);
    PUT(r, (unsigned long long)num("reasons", d->gpu, 0));
    return OK;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int type, int counter, unsigned long long *n) {
    ENTER(d);
    char k[32];
    snprintf(k, sizeof k, "ecc_%d_%d", type, counter);
    PUT(n, (unsigned long long)num(k, d->gpu, 0));
    return OK;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned *corr, unsigned *unc, unsigned *pending,
                                       unsigned *failure) {
    ENTER(d);
    PUT(corr, (unsigned)num("remap_corr", d->gpu, 0)); PUT(unc, (unsigned)num("remap_unc", d->gpu, 0));
    PUT(pending, (unsigned)num("remap_pending", d->gpu, 0)); PUT(failure, (unsigned)num("remap_failure", d->gpu, 0));
    return OK;
}

nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned *kbps) {
    ENTER(d);
    PUT(kbps, (unsigned)(num(counter == 0 ? "pcie_tx_bps" : "pcie_rx_bps", d->gpu, 1e9) / 1024));
    return OK;
}

/* The driver's utilisation buffer: one sample every sample_period_s, the last sample_depth of them. */
nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t d, int type, unsigned long long last_seen, unsigned *value_type,
                                  unsigned *count, nvmlSample_t *samples) {
    ENTER(d);
    if (type != 1 || !value_type || !count) return type != 1 ? NOT_SUPPORTED : INVALID_ARGUMENT;
    double period = num("sample_period_s", d->gpu, 1.0 / 6);
    long depth = (long)num("sample_depth", d->gpu, 120);
    long newest = (long)(now_s() / period), first = newest - depth + 1;
    while (first <= newest && (unsigned long long)(first * period * 1e6) <= last_seen) first++;
    unsigned n = first <= newest ? (unsigned)(newest - first + 1) : 0;
    if (!n) return NOT_FOUND;
    *value_type = VT_UINT;
    if (!samples) { *count = n; return OK; }
    if (*count < n) n = *count;  /* newer samples arrived since the sizing call: the oldest fit */
    const char *list = get("samples", d->gpu);
    for (unsigned i = 0; i < n; i++) {
        long k = first + i;
        unsigned value = (unsigned)num("util", d->gpu, 37);
        if (list) {  /* the (k mod len)-th entry of the comma-separated list */
            int len = 1;
            for (const char *p = list; *p; p++) len += *p == ',';
            const char *p = list;
            for (int j = (int)(k % len); j > 0; j--) p = strchr(p, ',') + 1;
            value = (unsigned)strtoul(p, NULL, 10);
        }
        samples[i].timeStamp = (unsigned long long)(k * period * 1e6);
        samples[i].sampleValue.ui = value;
    }
    *count = n;
    return OK;
}

/* ---- processes ---------------------------------------------------------------------------------- */
static nvmlReturn_t processes(nvmlDevice_t d, const char *key, unsigned *count, nvmlProcessInfo_t *infos) {
    if (!count) return INVALID_ARGUMENT;
    const char *list = get(key, d->gpu);
    unsigned n = 0, cap = infos ? *count : 0;
    for (const char *p = list; p && *p; n++) {
        unsigned pid;
        unsigned long long bytes;
        if (sscanf(p, "%u:%llu", &pid, &bytes) != 2) break;
        if (n < cap) infos[n] = (nvmlProcessInfo_t){ pid, bytes, 0xFFFFFFFFu, 0xFFFFFFFFu };
        p = strchr(p, ',');
        if (p) p++;
    }
    *count = n;
    return n > cap ? INSUFFICIENT_SIZE : OK;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned *count, nvmlProcessInfo_t *infos) {
    ENTER(d);
    return processes(d, "procs", count, infos);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned *count, nvmlProcessInfo_t *infos) {
    ENTER(d);
    return processes(d, "gprocs", count, infos);  /* none unless configured */
}
/* Per-process samples: one per "pid:sm%" of proc_util, stamped now; NotFound when none is newer than
 * last_seen. The sizing call (NULL buffer) answers InsufficientSize with the count, as the driver does. */
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, nvmlProcessUtilizationSample_t *samples,
                                             unsigned *count, unsigned long long last_seen) {
    ENTER(d);
    if (!count) return INVALID_ARGUMENT;
    unsigned long long now_us = (unsigned long long)(now_s() * 1e6);
    const char *list = get("proc_util", d->gpu);
    unsigned n = 0, cap = samples ? *count : 0;
    for (const char *p = list; p && *p && now_us > last_seen; n++) {
        unsigned pid, sm;
        if (sscanf(p, "%u:%u", &pid, &sm) != 2) break;
        if (n < cap) samples[n] = (nvmlProcessUtilizationSample_t){ pid, now_us, sm, sm / 2, 0, 0 };
        p = strchr(p, ',');
        if (p) p++;
    }
    if (!n) return NOT_FOUND;
    *count = n;
    return n > cap ? INSUFFICIENT_SIZE : OK;
}

/* ---- MIG ---------------------------------------------------------------------------------------- */
static int mig_ids(int gpu, int *ids) {
    const char *list = get("mig", gpu);
    int n = 0;
    for (const char *p = list; p && *p && n < MAX_MIG; ) {
        ids[n++] = atoi(p);
        p = strchr(p, ',');
        if (p) p++;
    }
    return n;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned *current, unsigned *pending) {
    ENTER(d);
    int ids[MAX_MIG];
    unsigned on = mig_ids(d->gpu, ids) > 0;
    PUT(current, on);
    PUT(pending, on);
    return OK;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned index, nvmlDevice_t *out) {
    ENTER(d);
    int ids[MAX_MIG];
    if (index >= MAX_MIG) return INVALID_ARGUMENT;
    if ((int)index >= mig_ids(d->gpu, ids)) return NOT_FOUND;
    mig_devices[d->gpu][index].gi = ids[index];
    PUT(out, &mig_devices[d->gpu][index]);
    return OK;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned *id) {
    ENTER(d);
    if (d->gi < 0) return INVALID_ARGUMENT;
    PUT(id, (unsigned)d->gi);
    return OK;
}
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned *id) {
    ENTER(d);
    if (d->gi < 0) return INVALID_ARGUMENT;
    PUT(id, 0);
    return OK;
}

/* ---- field values: PCIe byte counters, per-link NVLink counters, scalars that have a call too -------- */
/* A scalar field's answer: what its call would answer (fail.<call>, KEY=na), unless field_na lists it. */
static nvmlReturn_t scalar_field(nvmlFieldValue_t *v, int gpu, const char *call, const char *key, double dflt) {
    const char *na = get("field_na", gpu);
    char id[16];
    snprintf(id, sizeof id, "%u", v->fieldId);
    for (const char *p = na; p && *p; p += strcspn(p, ",") + (p[strcspn(p, ",")] == ',')) {
        size_t n = strcspn(p, ",");
        if (n == strlen(id) && !strncmp(p, id, n)) return NOT_SUPPORTED;
    }
    char k[128];
    snprintf(k, sizeof k, "fail.%s", call);
    int fail = (int)num(k, gpu, 0);
    if (fail) return fail;
    if (is_na(key, gpu)) return NOT_SUPPORTED;
    v->valueType = v->fieldId == FI_ENERGY ? VT_ULL : VT_UINT;
    if (v->fieldId == FI_ENERGY) v->value.ull = (unsigned long long)num(key, gpu, dflt);
    else v->value.ui = (unsigned)num(key, gpu, dflt);
    return OK;
}

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int n, nvmlFieldValue_t *values) {
    ENTER(d);
    if (n < 0 || (n && !values)) return INVALID_ARGUMENT;
    double t = now_s(), since = t - t_first_init;
    int links = (int)num("nvlink_links", d->gpu, 0);
    for (int i = 0; i < n; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = (int64_t)(t * 1e6);
        v->latencyUsec = 0;
        v->nvmlReturn = OK;
        v->valueType = VT_ULL;
        int link_field = v->fieldId == FI_NVLINK_TX || v->fieldId == FI_NVLINK_RX;
        if ((v->fieldId == FI_PCIE_TX || v->fieldId == FI_PCIE_RX) && !num("pcie_counters", d->gpu, 1))
            v->nvmlReturn = NOT_SUPPORTED;  /* drivers before R555 */
        else if (v->fieldId == FI_PCIE_TX || v->fieldId == FI_PCIE_RX)  /* bytes since start at a constant rate */
            v->value.ull = (unsigned long long)(num(v->fieldId == FI_PCIE_TX ? "pcie_tx_bps" : "pcie_rx_bps",
                                                    d->gpu, 1e9) * since);
        else if (v->fieldId == FI_ENERGY)  /* the defaults are the calls' */
            v->nvmlReturn = scalar_field(v, d->gpu, "nvmlDeviceGetTotalEnergyConsumption", "energy_mj", 123456789);
        else if (v->fieldId == FI_REPLAY)
            v->nvmlReturn = scalar_field(v, d->gpu, "nvmlDeviceGetPcieReplayCounter", "replay", 0);
        else if (v->fieldId == FI_POWER_AVERAGE)
            v->nvmlReturn = scalar_field(v, d->gpu, "nvmlDeviceGetPowerUsage", "power_mw", 250000);
        else if (v->fieldId == FI_NVLINK_LINK_COUNT && links > 0) {
            v->valueType = VT_UINT;
            v->value.ui = (unsigned)links;
        } else if (link_field && links > 0 && v->scopeId < (unsigned)links)  /* KiB since start */
            v->value.ull = (unsigned long long)(num(v->fieldId == FI_NVLINK_TX ? "nvlink_tx_kib_s" : "nvlink_rx_kib_s",
                                                    d->gpu, 0) * since);
        else
            v->nvmlReturn = link_field && links > 0 ? INVALID_ARGUMENT : NOT_SUPPORTED;
    }
    return OK;
}

/* ---- events ------------------------------------------------------------------------------------- */
nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    ENTER(NULL);
    PUT(set, calloc(1, sizeof **set));
    return OK;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    ENTER(d);
    if (!set || d->gi >= 0) return INVALID_ARGUMENT;
    if (types & XID_EVENT) set->registered[d->gpu] = 1;
    return OK;
}

/* Hands out the next XID of a GPU registered on this set, polling every 10 ms until timeout_ms. Like the
 * driver, every set with the GPU registered sees every event. */
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned timeout_ms) {
    ENTER(NULL);
    if (!set || !data) return INVALID_ARGUMENT;
    /* Polls every 50 ms: the driver blocks in the kernel, so a stand-in that woke every 10 ms would bill
     * the exporter ~100 wake-ups a second that it does not have on a GPU node. */
    for (double waited = 0;; waited += 0.05) {
        pthread_mutex_lock(&mu);
        reload();
        for (int i = 0; i < n_xids; i++) {
            int gpu = xids[i].gpu;
            if (xids[i].seq <= set->seen || gpu < 0 || gpu >= MAX_GPUS || !set->registered[gpu]) continue;
            *data = (nvmlEventData_t){ &devices[gpu], XID_EVENT, xids[i].xid, 0xFFFFFFFFu, 0xFFFFFFFFu };
            set->seen = xids[i].seq;
            pthread_mutex_unlock(&mu);
            return OK;
        }
        pthread_mutex_unlock(&mu);
        if (waited * 1000 >= timeout_ms) return TIMEOUT;
        sleep_s(0.05);
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    ENTER(NULL);
    free(set);
    return OK;
}

/* ---- GPM ---------------------------------------------------------------------------------------- */
nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t d, nvmlGpmSupport_t *s) {
    ENTER(d);
    if (!s) return INVALID_ARGUMENT;
    if (s->version != 1) return ARGUMENT_VERSION_MISMATCH;
    s->isSupportedDevice = (unsigned)num("gpm_supported", d->gpu, 1);
    return OK;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *out) {
    ENTER(NULL);
    nvmlGpmSample_t s = calloc(1, sizeof *s);
    s->magic = GPM_MAGIC;
    s->gpu = -1;
    PUT(out, s);
    return OK;
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t s) {
    ENTER(NULL);
    if (!s || s->magic != GPM_MAGIC) return INVALID_ARGUMENT;
    s->magic = 0;
    free(s);
    return OK;
}

static nvmlReturn_t gpm_sample(nvmlDevice_t d, int gi, nvmlGpmSample_t s) {
    if (!s || s->magic != GPM_MAGIC) return INVALID_ARGUMENT;
    if (!num("gpm_supported", d->gpu, 1)) return NOT_SUPPORTED;
    s->gpu = d->gpu;
    s->gi = gi;
    s->t = now_s();
    return OK;
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t d, nvmlGpmSample_t s) { ENTER(d); return gpm_sample(d, -1, s); }

nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t d, unsigned gi, nvmlGpmSample_t s) {
    ENTER(d);
    int ids[MAX_MIG], n = mig_ids(d->gpu, ids);
    for (int i = 0; i < n; i++)
        if (ids[i] == (int)gi) return gpm_sample(d, (int)gi, s);
    return NOT_FOUND;
}

/* Metric values are the configured ones; like the driver, samples under 100 ms apart are refused. */
nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *m) {
    if (!init_count) return UNINITIALIZED;
    if (!m) return INVALID_ARGUMENT;
    if (m->version != 1) return ARGUMENT_VERSION_MISMATCH;
    nvmlGpmSample_t a = m->sample1, b = m->sample2;
    if (!a || !b || a->magic != GPM_MAGIC || b->magic != GPM_MAGIC || a->gpu < 0 || a->gpu != b->gpu ||
        a->gi != b->gi || b->t - a->t < 0.1 || m->numMetrics > 1024)
        return INVALID_ARGUMENT;
    ENTER(&devices[a->gpu]);  /* faults of the samples' GPU */
    for (unsigned i = 0; i < m->numMetrics; i++) {
        nvmlGpmMetric_t *g = &m->metrics[i];
        char k[64];
        const char *v = NULL;
        if (a->gi >= 0) {
            snprintf(k, sizeof k, "gpm.%u.gi%d", g->metricId, a->gi);
            v = get(k, a->gpu);
        }
        if (!v) {
            snprintf(k, sizeof k, "gpm.%u", g->metricId);
            v = get(k, a->gpu);
        }
        g->nvmlReturn = v ? OK : NOT_SUPPORTED;
        g->value = v ? strtod(v, NULL) : 0;  /* strtod reads "nan" and "inf" too */
        g->metricInfo = (nvmlGpmMetricInfo_t){ NULL, NULL, NULL };
    }
    return OK;
}
