/* check.c - helpers for tests: temporary directories. */
#define _GNU_SOURCE
#include "check.h"

#include <ftw.h>
#include <stdio.h>
#include <unistd.h>

char *check_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof(path), "%s/capsule-%s-XXXXXX", base && *base ? base : "/tmp", tag);
    CHECK(mkdtemp(path) != NULL);
    return cap_strdup(path);
}

static int check_rm_one(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(p);
}

void check_rmtree(const char *dir)
{
    if (dir)
        nftw(dir, check_rm_one, 16, FTW_DEPTH | FTW_PHYS);
}
