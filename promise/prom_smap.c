/*
 * prom_smap.c - the string-keyed hash map of promise/ (id -> document, and the like): open
 * addressing with linear probing, the key's 64-bit hash kept in the slot (probes compare it before
 * the string), and real deletion by backward shift (no tombstones: a deleted slot is refilled by
 * the entries of its probe run that may move closer to their home slot, so lookups stay exact and
 * the table never fills with dead slots). Capacity is a power of two, load <= 1/2; it does not
 * shrink (bounded by the peak).
 */
#include <string.h>

#include "prom_int.h"

static size_t smap_find(const prom__smap_t *m, const char *key, uint64_t h)
{
    size_t mask = m->cap - 1;
    size_t i = (size_t)h & mask;
    while (m->e[i].key && (m->e[i].h != h || strcmp(m->e[i].key, key) != 0))
        i = (i + 1) & mask;
    return i;
}

void *prom__smap_get(const prom__smap_t *m, const char *key)
{
    if (!m->cap)
        return NULL;
    return m->e[smap_find(m, key, cap_hash64(key, strlen(key)))].val;
}

void prom__smap_put(prom__smap_t *m, const char *key, void *val)
{
    if ((m->n + 1) * 2 > m->cap) {
        size_t ncap = m->cap ? m->cap * 2 : 64;
        prom__smap_t g = {cap_calloc(ncap, sizeof(prom__smap_ent_t)), ncap, 0};
        for (size_t i = 0; i < m->cap; i++)
            if (m->e[i].key) {
                g.e[smap_find(&g, m->e[i].key, m->e[i].h)] = m->e[i];
                g.n++;
            }
        cap_free(m->e);
        *m = g;
    }
    uint64_t h = cap_hash64(key, strlen(key));
    size_t i = smap_find(m, key, h);
    if (!m->e[i].key)
        m->n++;
    m->e[i] = (prom__smap_ent_t){key, h, val};
}

void *prom__smap_del(prom__smap_t *m, const char *key)
{
    if (!m->cap)
        return NULL;
    size_t mask = m->cap - 1;
    size_t i = smap_find(m, key, cap_hash64(key, strlen(key)));
    if (!m->e[i].key)
        return NULL;
    void *val = m->e[i].val;
    /* backward shift: walk the run after the hole; an entry whose home slot is NOT cyclically in
     * (hole, j] can move into the hole (its probe from home passes the hole) */
    for (size_t j = (i + 1) & mask; m->e[j].key; j = (j + 1) & mask) {
        size_t home = (size_t)m->e[j].h & mask;
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            m->e[i] = m->e[j];
            i = j;
        }
    }
    m->e[i] = (prom__smap_ent_t){NULL, 0, NULL};
    m->n--;
    return val;
}

void prom__smap_free(prom__smap_t *m)
{
    cap_free(m->e);
    memset(m, 0, sizeof(*m));
}
