{{/* Names and labels. */}}
{{- define "sluiceway.name" -}}
{{- default "sluiceway-operator" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-operator": release "sluiceway" gives the names rbac.yaml and deploy/ use. */}}
{{- define "sluiceway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if hasSuffix "-operator" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluiceway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluiceway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: set it when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sluiceway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluiceway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluiceway.labels" -}}
{{ include "sluiceway.selectorLabels" . }}
app.kubernetes.io/part-of: sluiceway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "sluiceway.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The operator's RBAC rules, read from files/rbac.yaml: a link to operator/sluiceway_operator/rbac.yaml,
the single source (a verb added there reaches the chart with no edit here). Output: YAML
{cluster: [rules on cluster-scoped resources], namespaced: [rules on namespaced resources]}, so a
namespaced install can put only the latter into Roles.
*/}}
{{- define "sluiceway.rules" -}}
{{- $clusterScoped := list "customresourcedefinitions" "namespaces" -}}
{{- $cluster := list -}}
{{- $namespaced := list -}}
{{- range $doc := regexSplit "(?m)^---[ \t]*$" (.Files.Get "files/rbac.yaml") -1 -}}
{{- $obj := fromYaml $doc -}}
{{- if eq (get $obj "kind") "ClusterRole" -}}
{{- range $rule := $obj.rules -}}
{{- $c := list -}}
{{- $n := list -}}
{{- range $res := $rule.resources -}}
{{- if has (first (splitList "/" $res)) $clusterScoped -}}{{- $c = append $c $res -}}{{- else -}}{{- $n = append $n $res -}}{{- end -}}
{{- end -}}
{{- if $c -}}{{- $cluster = append $cluster (merge (dict "resources" $c) (omit $rule "resources")) -}}{{- end -}}
{{- if $n -}}{{- $namespaced = append $namespaced (merge (dict "resources" $n) (omit $rule "resources")) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (or $cluster $namespaced) -}}
{{- fail "files/rbac.yaml holds no ClusterRole rules: is the link to operator/sluiceway_operator/rbac.yaml broken?" -}}
{{- end -}}
{{- toYaml (dict "cluster" $cluster "namespaced" $namespaced) -}}
{{- end -}}
