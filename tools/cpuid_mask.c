/* Preloaded into a process (LD_PRELOAD), makes every library in it see an older x86-64 CPU: CPUID faults
 * (Linux's ARCH_SET_CPUID, on CPUs with CPUID faulting), and the fault handler answers the real CPUID with the
 * profile's extensions cleared. Each library then picks the kernels it would pick on that CPU, at this CPU's
 * speed: PyTorch's ATen and oneDNN, and ONNX Runtime's MLAS, which no environment variable can hold back.
 * Built and used by tools/cpu_isa.py; the service never loads it.
 *
 * PETCLF_CPUID_PROFILE: avx2   (no AVX-512, AMX, AVX-VNNI: a Haswell..Comet Lake or AMD Zen 1-3 core)
 *                       avx512 (AVX-512 with VNNI and BF16, no AMX, FP16, AVX-VNNI: an AMD Zen 4 core)
 * PETCLF_CPUID_REPORT=1: one line on stderr at exit, how many CPUID instructions were answered.
 * Exec clears CPUID faulting, and LD_PRELOAD starts it again in every child; forks and threads inherit it. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* Leaf 7 sub-leaf 0 (EBX, ECX, EDX) and sub-leaf 1 (EAX, EDX) bits to clear. */
struct hidden { uint32_t ebx0, ecx0, edx0, eax1, edx1; };

/* AMX (TILE 24, INT8 25, BF16 22, FP16 eax1 21, COMPLEX edx1 8), AVX512_FP16 (23), VP2INTERSECT (8), AVX-VNNI
 * (eax1 4), AVX-IFMA (eax1 23), AVX-VNNI-INT8/INT16 (edx1 4, 10), AVX-NE-CONVERT (edx1 5), AVX10 (edx1 19). */
static const struct hidden beyond_zen4 = {
    0, 0, BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25),
    BIT(4) | BIT(21) | BIT(23), BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19),
};
/* ...and all of AVX-512: F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31; VBMI 1, VBMI2 6, VNNI 11,
 * BITALG 12, VPOPCNTDQ 14; 4VNNIW 2, 4FMAPS 3; BF16 (eax1 5). */
static const struct hidden beyond_avx2 = {
    BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31),
    BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14),
    BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25),
    BIT(4) | BIT(5) | BIT(21) | BIT(23), BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19),
};

static const struct hidden *profile;
static struct sigaction chained;  /* the SIGSEGV handler the process asked for, called for real faults */
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);
static volatile unsigned long answered;

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void hide(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        r[1] &= ~profile->ebx0; r[2] &= ~profile->ecx0; r[3] &= ~profile->edx0;
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~profile->eax1; r[3] &= ~profile->edx1;
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)regs[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {  /* a faulting CPUID */
        uint32_t leaf = (uint32_t)regs[REG_RAX], sub = (uint32_t)regs[REG_RCX], r[4];
        set_cpuid(1);
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
        set_cpuid(0);
        hide(leaf, sub, r);
        regs[REG_RAX] = r[0]; regs[REG_RBX] = r[1]; regs[REG_RCX] = r[2]; regs[REG_RDX] = r[3];
        regs[REG_RIP] += 2;
        answered++;
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else {  /* the default action: returning re-runs the faulting instruction, which now ends the process */
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL);
    }
}

/* Others' SIGSEGV handlers (Python's faulthandler, ...) are chained behind ours instead of replacing it. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !profile) return real_sigaction(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

static void report(void) {
    fprintf(stderr, "cpuid_mask: pid %d answered %lu CPUID instructions\n", getpid(), answered);
}

__attribute__((constructor)) static void start(void) {
    const char *name = getenv("PETCLF_CPUID_PROFILE");
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (!name || !strcmp(name, "")) return;
    if (!strcmp(name, "avx2")) profile = &beyond_avx2;
    else if (!strcmp(name, "avx512")) profile = &beyond_zen4;
    else {
        fprintf(stderr, "cpuid_mask: PETCLF_CPUID_PROFILE=%s is not one of avx2, avx512\n", name);
        _exit(2);
    }
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&ours.sa_mask);
    real_sigaction(SIGSEGV, &ours, &chained);
    if (set_cpuid(0) != 0) {  /* without faulting every library would see the whole CPU: refuse, never mislead */
        fprintf(stderr, "cpuid_mask: this CPU or kernel has no CPUID faulting (cpuid_fault in /proc/cpuinfo)\n");
        _exit(2);
    }
    const char *wanted = getenv("PETCLF_CPUID_REPORT");
    if (wanted && !strcmp(wanted, "1")) atexit(report);
}
