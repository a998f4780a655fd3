/*
 * eng_iocpu.c - which CPU takes the completion interrupts of the disk under the data directory.
 *
 * A durable commit is one O_DIRECT|O_DSYNC journal write: the wal writer sleeps in it until the
 * disk's completion interrupt wakes it. When the writer sleeps on the CPU that takes that
 * interrupt, the wake-up is local; on the other CPU it is an inter-processor wake-up of a thread
 * whose CPU may be idle (measured on this 2-vCPU VM, virtio-blk with one request queue whose
 * interrupt goes to CPU 1: a 4 KiB write pinned to CPU 1 completed 12-550 us sooner at p50 than
 * pinned to CPU 0, 5 of 5 pairs). ENG_AFFINITY_AUTO therefore places a lone execution on that
 * CPU rather than wherever the loop happens to run.
 *
 * How: stat(dir)'s device -> /sys/dev/block/MAJ:MIN -> up its sysfs path to the first directory
 * with msi_irqs (the PCI function of the disk, through partitions and virtio/nvme layers) -> the
 * CPU in each of those interrupts' effective_affinity_list, weighted by the interrupt counts in
 * /proc/interrupts -> the CPU that took most. -1 (no preference) when any step is missing: a
 * device-mapper or network file system, tmpfs, a container without /sys, or interrupts spread
 * over CPUs (a multi-queue disk whose queues follow the submitting CPU needs no placement).
 * CAPSULE_IO_CPU=N overrides (-1: no preference).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "eng_int.h"

#define IOCPU_MAX 1024

/* The interrupt count of irq on each CPU, summed into per_cpu (per_cpu[c] += count on c). */
static void irq_counts(int irq, unsigned long long *per_cpu, int ncpu)
{
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f)
        return;
    char line[8192];
    while (fgets(line, sizeof line, f)) {
        char *p = line, *end;
        long n = strtol(p, &end, 10);
        if (end == p || *end != ':' || n != irq)
            continue;
        p = end + 1;
        for (int c = 0; c < ncpu; c++) {
            unsigned long long v = strtoull(p, &end, 10);
            if (end == p)
                break;
            per_cpu[c] += v;
            p = end;
        }
        break;
    }
    fclose(f);
}

/* The single CPU irq is delivered to, or -1 (several, or unknown). */
static int irq_cpu(int irq)
{
    char path[64], buf[64];
    snprintf(path, sizeof path, "/proc/irq/%d/effective_affinity_list", irq);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char *ok = fgets(buf, sizeof buf, f);
    fclose(f);
    if (!ok)
        return -1;
    char *end;
    long c = strtol(buf, &end, 10);
    if (end == buf || (*end != '\n' && *end != '\0') || c < 0 || c >= IOCPU_MAX)
        return -1; /* a range or a list: spread */
    return (int)c;
}

int eng__io_cpu(const char *dir)
{
    const char *env = getenv("CAPSULE_IO_CPU");
    if (env && *env) {
        char *end;
        long c = strtol(env, &end, 10);
        return *end || c < -1 || c >= IOCPU_MAX ? -1 : (int)c;
    }
    struct stat st;
    if (stat(dir, &st) != 0)
        return -1;
    char link[128], path[PATH_MAX];
    snprintf(link, sizeof link, "/sys/dev/block/%u:%u", major(st.st_dev), minor(st.st_dev));
    if (!realpath(link, path))
        return -1;
    DIR *d = NULL;
    while (strlen(path) > strlen("/sys/devices")) {
        size_t n = strlen(path);
        if (n + sizeof "/msi_irqs" <= sizeof path) {
            strcat(path, "/msi_irqs");
            if ((d = opendir(path)) != NULL)
                break;
            path[n] = '\0';
        }
        char *slash = strrchr(path, '/');
        if (!slash)
            break;
        *slash = '\0';
    }
    if (!d)
        return -1;
    unsigned long long by_cpu[IOCPU_MAX] = {0}, one[IOCPU_MAX];
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char *end;
        long irq = strtol(de->d_name, &end, 10);
        if (end == de->d_name || *end)
            continue;
        int c = irq_cpu((int)irq);
        if (c < 0)
            continue;
        memset(one, 0, sizeof one);
        irq_counts((int)irq, one, c + 1);
        by_cpu[c] += one[c];
    }
    closedir(d);
    int best = -1;
    unsigned long long total = 0;
    for (int c = 0; c < IOCPU_MAX; c++) {
        total += by_cpu[c];
        if (by_cpu[c] && (best < 0 || by_cpu[c] > by_cpu[best]))
            best = c;
    }
    /* a clear majority only: interrupts spread over CPUs need no placement */
    return best >= 0 && by_cpu[best] * 4 >= total * 3 ? best : -1;
}

/*
 * The guest's idle polling. On a KVM guest whose cpuidle driver is haltpoll, an idle vCPU polls
 * guest_halt_poll_ns before it halts; at 0 it halts at once, and every wake-up of a thread on it
 * (the journal write's completion, the loop, a worker, the caller) first waits for the host to
 * run that vCPU again. A lone durable execution is a chain of such wake-ups around two flushes.
 * Measured on this 2-vCPU VM (5 alternating pairs, 0 vs 200000 ns, bench_engine --only lat and
 * bench_wal --only lat --quick): eng_execute_sync 2+2 p50 sync 972 -> 757 us, nosync 218 -> 125
 * us; one wal_log_append_sync 260 -> 186 us. The engine never changes it (a host setting: it
 * spends CPU polling); it says so at open. Returns the value, or -1 when the driver is not
 * haltpoll or the files are missing.
 */
long eng__halt_poll_ns(void)
{
    char buf[64];
    FILE *f = fopen("/sys/devices/system/cpu/cpuidle/current_driver", "r");
    if (!f)
        return -1;
    int ok = fgets(buf, sizeof buf, f) && strncmp(buf, "haltpoll", 8) == 0;
    fclose(f);
    if (!ok || !(f = fopen("/sys/module/haltpoll/parameters/guest_halt_poll_ns", "r")))
        return -1;
    long v = fgets(buf, sizeof buf, f) ? strtol(buf, NULL, 10) : -1;
    fclose(f);
    return v;
}
