/*
 * auth.c - bearer tokens. Tokens come from a file (one per line, '#' comments) and/or a
 * comma-separated list (CAPSULE_TOKENS). Only their SHA-256 digests are kept in memory; a presented
 * token is hashed and compared with every stored digest in constant time (no early exit), so
 * neither the timing nor the position of a match reveals anything about the tokens.
 *
 * A principal is "t-" + hex of the first 8 bytes of the digest: stable across restarts and
 * reorderings of the token file, and not the token itself (it appears in logs and in stored
 * session ownership).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "cap.h"
#include "srv_int.h"

#define TOKEN_MAX 512

typedef struct token {
    uint8_t digest[32];
    char principal[24];
} token_t;

struct srv__auth {
    token_t *tokens;
    size_t n;
};

static void trim(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
        s[--n] = 0;
    size_t k = 0;
    while (s[k] == ' ' || s[k] == '\t')
        k++;
    memmove(s, s + k, n - k + 1);
}

static int add_token(srv__auth_t *a, const char *tok)
{
    size_t len = strlen(tok);
    if (len == 0)
        return 0;
    if (len > TOKEN_MAX)
        return CAP_EINVAL;
    for (const char *c = tok; *c; c++)
        if ((unsigned char)*c <= ' ' || (unsigned char)*c >= 0x7f || *c == ',')
            return CAP_EINVAL;
    a->tokens = cap_realloc(a->tokens, (a->n + 1) * sizeof(*a->tokens));
    token_t *t = &a->tokens[a->n++];
    srv__sha256(tok, len, t->digest);
    strcpy(t->principal, "t-");
    for (int i = 0; i < 8; i++)
        snprintf(t->principal + 2 + 2 * i, 3, "%02x", t->digest[i]);
    return 0;
}

int srv__auth_open(const char *file, const char *list, srv__auth_t **out)
{
    int rc = 0;
    FILE *f = NULL;
    srv__auth_t *a = cap_calloc(1, sizeof(*a));
    if (file && *file) {
        f = fopen(file, "r");
        if (!f) {
            rc = -errno;
            cap_log(CAP_LOG_ERROR, "http", "cannot read tokens file %s: %s", file, strerror(errno));
            goto out;
        }
        struct stat st;
        if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
            cap_log(CAP_LOG_WARN, "http",
                    "tokens file %s is readable by group or others (mode %03o): chmod 600 it", file,
                    (unsigned)(st.st_mode & 0777));
        char line[TOKEN_MAX + 8];
        size_t before = a->n;
        int lineno = 0;
        while (fgets(line, sizeof(line), f)) {
            lineno++;
            if (!strchr(line, '\n') && !feof(f)) {
                cap_log(CAP_LOG_ERROR, "http", "tokens file %s:%d: line too long", file, lineno);
                rc = CAP_EINVAL;
                goto out;
            }
            trim(line);
            if (line[0] == '#' || line[0] == 0)
                continue;
            if ((rc = add_token(a, line)) != 0) {
                cap_log(CAP_LOG_ERROR, "http",
                        "tokens file %s:%d: a token is 1..%d printable non-space characters "
                        "without ','",
                        file, lineno, TOKEN_MAX);
                goto out;
            }
        }
        if (a->n == before) {
            cap_log(CAP_LOG_ERROR, "http", "tokens file %s holds no token", file);
            rc = CAP_EINVAL;
            goto out;
        }
    }
    if (list && *list) {
        char *copy = cap_strdup(list), *save = NULL;
        for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            trim(t);
            if ((rc = add_token(a, t)) != 0) {
                cap_log(CAP_LOG_ERROR, "http", "a token in the token list is malformed");
                break;
            }
        }
        cap_free(copy);
        if (rc)
            goto out;
    }
out:
    if (f)
        fclose(f);
    if (rc) {
        srv__auth_close(a);
        return rc;
    }
    *out = a;
    return 0;
}

void srv__auth_close(srv__auth_t *a)
{
    if (!a)
        return;
    if (a->tokens)
        memset(a->tokens, 0, a->n * sizeof(*a->tokens));
    cap_free(a->tokens);
    cap_free(a);
}

int srv__auth_enabled(const srv__auth_t *a)
{
    return a->n > 0;
}

int srv__auth_check(const srv__auth_t *a, const char *authz, const char **principal)
{
    if (!authz || strncasecmp(authz, "Bearer ", 7) != 0)
        return CAP_EINVAL;
    const char *tok = authz + 7;
    while (*tok == ' ')
        tok++;
    size_t len = strlen(tok);
    while (len && tok[len - 1] == ' ')
        len--;
    if (len == 0 || len > TOKEN_MAX)
        return CAP_EINVAL;
    uint8_t d[32];
    srv__sha256(tok, len, d);
    const token_t *found = NULL;
    for (size_t i = 0; i < a->n; i++) {
        /* No early exit: every stored digest is compared. */
        int eq = srv__ct_equal(d, a->tokens[i].digest, 32);
        if (eq && !found)
            found = &a->tokens[i];
    }
    if (!found)
        return CAP_EINVAL;
    *principal = found->principal;
    return 0;
}
