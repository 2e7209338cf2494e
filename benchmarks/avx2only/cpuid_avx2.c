/* LD_PRELOAD shim: the process sees an AVX2-only x86 CPU (no AVX-512, no AVX-VNNI, no AMX).
 *
 * Why by hand: the weakest machine of this kind has only AVX2, and none was available. ONNX Runtime,
 * OpenVINO, oneDNN and numpy choose their kernels from the CPUID instruction at run time; only oneDNN
 * has a cap (ONEDNN_MAX_CPU_ISA). Intel SDE is no package, and QEMU's emulation is far too slow to
 * time anything. Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, the `cpuid_fault` flag, the way
 * rr makes CPUID deterministic) turns each CPUID in this process into a SIGSEGV; the handler runs the
 * real CPUID, clears the AVX-512/AMX/AVX-VNNI bits and steps over the instruction. The setting is
 * inherited by threads and fork()ed children and reset by execve (LD_PRELOAD then installs it again).
 *
 * It emulates the instruction set, not the microarchitecture: AVX2 kernels on this CPU's cores and
 * clocks. Benchmarks only; never part of semwatch.  Build: gcc -O2 -shared -fPIC -o x.so this.c
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23 */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
    } else if (leaf == 0xD && sub == 0) {
        /* the XSAVE components the OS enabled: drop opmask/ZMM (5-7) and AMX tiles (17-18) */
        r[0] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));
    }
}

static void on_fault(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: a real fault, let it crash as it would */
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    real_cpuid(leaf, sub, r);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    mask(leaf, sub, r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "cpuid_avx2: CPUID faulting is not available here; refusing to run unmasked\n");
        _exit(97);
    }
}
